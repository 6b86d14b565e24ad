"""Device names shared by teachers and students ('auto' = CUDA when available, else CPU)."""
import torch


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
