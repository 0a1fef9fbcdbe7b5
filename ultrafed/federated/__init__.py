"""Federated aggregation, update screening, drift metrics and transfer encoding: pure functions
over model state dicts (no I/O, no orchestration), so every round can be replayed and tested."""
from ultrafed.federated.metrics import (SiteDrift, cosine_to_mean, site_drift, spread, state_norm,
                                        update_norm, update_norms)
from ultrafed.federated.strategies import (STRATEGIES, AggregationResult, SiteUpdate, State, aggregate,
                                           fedavg, fedavg_weights, proximal_term, resolve_params)
from ultrafed.federated.transfer import (TRANSFER_DTYPES, decode_state, encode_state, encoded_nbytes,
                                         state_nbytes)
from ultrafed.federated.validation import norm_outliers, screen_updates, validate_update

__all__ = [
    "STRATEGIES", "TRANSFER_DTYPES", "AggregationResult", "SiteDrift", "SiteUpdate", "State",
    "aggregate", "cosine_to_mean", "decode_state", "encode_state", "encoded_nbytes", "fedavg",
    "fedavg_weights", "norm_outliers", "proximal_term", "resolve_params", "screen_updates",
    "site_drift", "spread", "state_nbytes", "state_norm", "update_norm", "update_norms",
    "validate_update",
]
