// Render the maths that pymdownx.arithmatex (generic mode) wraps in \( \) and \[ \],
// with the KaTeX copied into docs/javascripts/katex/ (no CDN). Material's instant loading
// replaces the page body, so render on every document$ emission.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
    ],
    throwOnError: false,
  });
});
