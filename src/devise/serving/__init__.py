"""Prediction, image search and its index, the web page and API."""
