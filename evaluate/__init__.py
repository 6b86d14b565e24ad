"""Evaluation on embeddings and labels (issue 4): FAISS nearest-label accuracy and the papers' metrics.
Imports only embedcache's store API."""
