"""Evaluation: retrieval recall@K, zero-shot metrics, template selection, linear probes.

The command line is `python -m keras_clip.evaluate`; its library function is
`keras_clip.evaluation.report.run_evaluation`.
"""
from keras_clip.evaluation.retrieval import encode_images  # noqa: F401
from keras_clip.evaluation.retrieval import encode_texts  # noqa: F401
from keras_clip.evaluation.retrieval import evaluate_retrieval  # noqa: F401
from keras_clip.evaluation.retrieval import retrieval_ranks  # noqa: F401
from keras_clip.evaluation.retrieval import retrieval_recall  # noqa: F401
