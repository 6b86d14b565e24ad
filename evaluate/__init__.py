"""Evaluation on embeddings and labels (issue 4): FAISS nearest-label accuracy and the papers' metrics.
Imports only the core (stores, registries, errors), never the students or the teachers."""
