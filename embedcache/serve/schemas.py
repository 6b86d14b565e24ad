"""Request bodies, as pydantic models apart from the routes (infinity's fastapi_schemas habit).
Answers are plain dicts built by the routes: they are stored whole in the ledger for replays."""
from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class ImagesRequest(BaseModel):
    """embedcache: raw base64 images of one format."""
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    format: Literal["png", "jpeg"] = "png"
    images: List[str] = Field(min_length=1)
    dimensions: Optional[int] = None


class TextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    texts: List[str] = Field(min_length=1)
    dimensions: Optional[int] = None


class CountTokensRequest(BaseModel):
    texts: List[str]


class OpenAIEmbeddingsRequest(BaseModel):
    """OpenAI's shape; ``modality: image`` (infinity's extension) takes data URIs."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    input: Union[str, List[str]]
    modality: Literal["text", "image"] = "text"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


class CohereEmbedRequest(BaseModel):
    """Cohere's v2 embed shape: texts, or images as data URIs with input_type "image"."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    input_type: str
    texts: Optional[List[str]] = None
    images: Optional[List[str]] = None
    inputs: Optional[list] = None
    embedding_types: List[str] = ["float"]
    output_dimension: Optional[int] = None
    truncate: Optional[str] = None
