"""Evaluation: verification protocols (pairs, ``.bin`` files, videos), embeddings, ROC plots.

Pure numpy (importing this package does not import torch):
    verification.evaluate_scores, cosine_scores, plot_roc, VerificationResult
    pairs.read_lfw_pairs, read_bin (safe: no arbitrary unpickling)
    video.pool_video, read_video_splits, evaluate_video_pairs
    ijb.read_protocol, template_features, template_scores, evaluate_ijb (IJB-B/C templates)
With torch:
    embed.load_model, embed_images; evaluate.load_verification_set, evaluate_model
    sets.load_eval_set (a training run's eval.sets entry, local or s3://)
"""

from seqface_dist.eval.pairs import BinSet, PairList, UnsafePickleError, read_bin, read_lfw_pairs
from seqface_dist.eval.verification import (
    VerificationResult,
    cosine_scores,
    evaluate_scores,
    plot_roc,
)
from seqface_dist.eval.video import evaluate_video_pairs, pool_video, read_video_splits

__all__ = [
    "BinSet", "PairList", "UnsafePickleError", "VerificationResult", "cosine_scores",
    "evaluate_scores", "evaluate_video_pairs", "plot_roc", "pool_video", "read_bin",
    "read_lfw_pairs", "read_video_splits",
]
