"""Evaluation: image-text retrieval recall@K and embedding helpers."""
from keras_clip.evaluation.retrieval import encode_images  # noqa: F401
from keras_clip.evaluation.retrieval import encode_texts  # noqa: F401
from keras_clip.evaluation.retrieval import evaluate_retrieval  # noqa: F401
from keras_clip.evaluation.retrieval import retrieval_ranks  # noqa: F401
from keras_clip.evaluation.retrieval import retrieval_recall  # noqa: F401
