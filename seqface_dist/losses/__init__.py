"""SeqFace losses, single-process pure tensor math (DESIGN §2).

Chief loss:  logits = sphereface_logits(f, W, t, N_id, lam=lambda_schedule(step))
             loss = lsr_cross_entropy(logits, t, N_id)
Any sequence mode (DESIGN §2.2a): chief_loss(f, W, t, N_id, N_seq, mode="sequence_classes")
Auxiliary:   S = sample_negatives(N, p, generator=g)
             terms = dsa_terms(f, t, C, N_id, S)   # terms.loss, .pull, .push, .active_fraction
`t` is the center index: the identity y, or N_id + q for a sample of sequence q.
"""

from .dsa import (
    DSATerms,
    center_loss,
    center_update_delta,
    counted_pairs,
    dsa_loss,
    dsa_terms,
    pairwise_quarter_sqdist,
)
from .indices import (
    center_index_from_reference_label,
    check_center_index,
    is_sequence,
    reference_label_from_center_index,
)
from .lsr import lsr_cross_entropy
from .margins import (
    MARGIN_KINDS,
    lambda_schedule,
    margin_logits,
    margin_target_cos,
    psi,
    psi_from_cos,
    reference_target_logit,
    sphereface_logits,
)
from .modes import ChiefTerms, chief_loss, chief_rows, visible_rows
from .sampling import SAMPLER_MODES, sample_negatives, sample_rows

__all__ = [
    "ChiefTerms",
    "chief_loss",
    "chief_rows",
    "visible_rows",
    "DSATerms",
    "MARGIN_KINDS",
    "SAMPLER_MODES",
    "center_index_from_reference_label",
    "center_loss",
    "center_update_delta",
    "check_center_index",
    "counted_pairs",
    "dsa_loss",
    "dsa_terms",
    "is_sequence",
    "lambda_schedule",
    "lsr_cross_entropy",
    "margin_logits",
    "margin_target_cos",
    "pairwise_quarter_sqdist",
    "psi",
    "psi_from_cos",
    "reference_label_from_center_index",
    "reference_target_logit",
    "sample_negatives",
    "sample_rows",
    "sphereface_logits",
]
