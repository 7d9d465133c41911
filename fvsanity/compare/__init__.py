"""Comparator: similarity metrics, statistics, attribution, verdict. Public API re-exported here.

Each module adds one import block below (a plain list; no logic in this file).
"""

from .attribution import (  # noqa: F401
    AttributionError,
    EdgeAttribution,
    LayerEdges,
    edge_attribution,
    edge_layers,
    node_attribution,
    patch_edges,
    reference_images,
)
from .circuits import (  # noqa: F401
    CircuitOverlap,
    LayerOverlap,
    circuit_overlap,
    circuit_stats,
    compare_circuits,
)
from .similarity import (  # noqa: F401
    METRIC_KINDS,
    MetricError,
    MetricInfo,
    UnknownMetricError,
    cka,
    cka_biased,
    compute_rdm,
    cosine,
    get_metric,
    list_metrics,
    metric_info,
    mmd2_unbiased,
    pearson,
    rankdata,
    register_metric,
    rsa,
    soft_spearman,
    spearman,
)
from .stats import (  # noqa: F401
    BootstrapCI,
    PermutationResult,
    bootstrap_ci,
    holm,
    permutation_test,
)
