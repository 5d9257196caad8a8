"""Datasets: 2-D toys, arrays, images."""
