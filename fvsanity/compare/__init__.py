"""Comparator: similarity metrics, statistics, attribution, verdict. Public API re-exported here.

Each module adds one import block below (a plain list; no logic in this file).
"""

from .attribution import (  # noqa: F401
    AttributionError,
    AttributionSettings,
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
    edge_rank_correlation,
)
from .path import PathCheckSettings, path_check  # noqa: F401
from .pipeline import NaturalPass, natural_pass, resolve_units  # noqa: F401
from .similarity import (  # noqa: F401
    DESIGNS,
    METRIC_KINDS,
    DesignError,
    MetricError,
    MetricInfo,
    UnknownMetricError,
    check_design,
    cka,
    cka_biased,
    compute_rdm,
    cosine,
    get_metric,
    list_metrics,
    metric_info,
    mmd2_unbiased,
    pearson,
    register_metric,
    rsa,
    soft_spearman,
    spearman,
    unregister_metric,
)
from .stats import (  # noqa: F401
    BootstrapCI,
    PermutationResult,
    bootstrap_ci,
    bootstrap_counts,
    bootstrap_indices,
    holm,
    percentile_interval,
    permutation_pvalue,
    permutation_test,
    rankdata,
)
from .verdict import (  # noqa: F401
    DIVERGES,
    INCONCLUSIVE,
    NATURAL_LIKE,
    OUTCOMES,
    ActivationRange,
    LayerEvidence,
    LayerOutcome,
    UnitVerdict,
    VerdictError,
    VerdictSettings,
    across_units_verdict,
    activation_range,
    attainable_p,
    layer_evidence,
    replicates_needed,
    unit_sentence,
    unit_verdict,
)
