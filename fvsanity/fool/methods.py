"""The built-in manipulation methods (``fvsanity fool --method``): the paper's fooling circuit and
silent units, each a :class:`~fvsanity.fool.manipulation.Manipulation` with its settings.

Their settings' fields carry the names (and defaults) of the ``fvsanity fool`` flags and of the
flat :class:`~fvsanity.fool.FoolSettings` fields they read (``det_steps`` <-> ``--det-steps``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .manipulation import Manipulation, MethodSettings, register_manipulation, setting
from .pipeline import DetectorBundle, fool_log, prepare_detector

__all__ = ["CircuitSettings", "FoolingCircuit", "SilentSettings", "SilentUnits"]


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}%"


@dataclass(frozen=True)
class CircuitSettings(MethodSettings):
    """The fooling circuit: its FV detector (:func:`~fvsanity.fool.prepare_detector`) and gate.

    Detector: ``det_units`` units (half class units of the output layer, half channels of the
    block layers) x ``det_seeds`` seeds, ``det_steps`` steps, images kept at ``det_checkpoints``
    and at the end, compared at ``det_size`` px (default min(64, input size)) after a stem of
    stride ``det_stem_stride``, trained ``det_epochs`` epochs; ``det_heldout_units`` other units
    for the held-out evaluation; with picture targets also the pictures' FV trajectories
    (``det_picture_seeds`` seeds, images at ``det_picture_checkpoints``). Threshold: the last
    ``calib_fraction`` of the training images, max logit + ``margin`` + ``margin_sd`` standard
    deviations. Routed units: the detector also learns the FV trajectories of the manipulated
    units and their source units (``det_routed_seeds`` seeds other than every evaluated FV's, at
    most ``det_routed_units`` units; :func:`~fvsanity.fool.prepare_detector`), then, for
    ``det_refine_rounds`` rounds, their FV trajectories on the circuit built so far: without them
    it rarely fires on the manipulated units' FVs and the circuit does not take effect. Gate:
    steepness ``k`` per logit and ``offset`` (:func:`~fvsanity.fool.fooling_gate`).
    """

    det_units: int = setting(48, "units whose FVs train the detector", min=1)
    det_heldout_units: int = setting(16, "other units for its held-out test", min=1)
    det_seeds: int = setting(1, "FV seeds per detector unit", min=1)
    det_steps: int = setting(256, "FV steps for detector data", min=1)
    det_checkpoints: tuple[int, ...] = setting((4, 16, 32, 64, 128), "kept optimization steps")
    det_size: int | None = setting(None, "detector input side in px [min(64, model input size)]", min=1, type=int)
    det_epochs: int = setting(60, "detector training epochs", min=1)
    det_stem_stride: int = setting(2, "stride of the detector's first convolution", min=1)
    det_picture_seeds: int = setting(8, "picture targets: FV-trajectory seeds of the picture templates", min=1)
    det_picture_checkpoints: tuple[int, ...] = setting((1, 2, 4, 8, 16, 32, 64, 128),
                                                       "picture targets: kept trajectory steps")
    calib_fraction: float = setting(0.2, "share of the training images that sets the threshold", gt=0, lt=1)
    margin: float = setting(1.0, "threshold = calib max + margin + margin-sd*sd", min=0)
    margin_sd: float = setting(0.25, "see --margin", min=0)
    k: float = setting(1000.0, "gate steepness per detector logit", gt=0)
    offset: float = setting(30.0, "gate offset: the gate opens from sigmoid(-offset)")
    det_routed_seeds: int = setting(8, "FV seeds of the routed (manipulated and source) units' own trajectories the "
                                       "detector learns (other seeds than the evaluation's; 0: none)", min=0)
    det_routed_units: int = setting(64, "at most this many routed units' trajectories (a seeded pick)", min=1)
    det_refine_rounds: int = setting(0, "rounds of: build the circuit, learn the routed units' FV trajectories on it, "
                                        "train the detector again", min=0)

    def check(self) -> None:
        from ..errors import FVSanityError

        # (picture checkpoints past det_steps are skipped, as render skips them: the defaults reach 128)
        if any(not 1 <= int(c) <= self.det_steps for c in self.det_checkpoints):
            raise FVSanityError(f"--det-checkpoints {','.join(map(str, self.det_checkpoints))!r} out of range; "
                                f"valid: 1..{self.det_steps} (--det-steps)")


@register_manipulation
class FoolingCircuit(Manipulation):
    """The paper's fooling circuit (section 3.1): an FV detector gates each routed unit to its
    target (:func:`~fvsanity.fool.build_fooling_circuit`); natural logits stay bit-identical."""

    name = "circuit"
    help = "the paper's fooling circuit: an FV detector gates the unit to the target"
    Settings = CircuitSettings

    def prepare(self, lm, routes, train_images, eval_images, settings, *, fool, work_dir, prepared=None):
        """The detector bundle (rendered, trained and calibrated in ``work_dir``, or reused)."""
        if prepared is None:
            return prepare_detector(lm, train_images, eval_images, fool, work_dir, routes=routes)
        if not isinstance(prepared, DetectorBundle):
            raise TypeError(f"the fooling circuit is prepared with a DetectorBundle, got {type(prepared).__name__}")
        if not prepared.picture_key and any(r.picture is not None for r in routes):
            fool_log("warning: the detector was not trained on these routes' picture trajectories; "
                     "the picture route may close early (pass routes= to prepare_detector)")
        return prepared

    def build(self, lm, routes, train_images, settings, *, prepared=None):
        from .circuit import build_fooling_circuit

        return build_fooling_circuit(lm, prepared.detector, routes, threshold=prepared.threshold, k=settings.k,
                                     offset=settings.offset, calibration_images=train_images)

    def describe(self, prepared, settings) -> dict:
        return {"detector": prepared.to_json()}

    def fv_diagnostics(self, fooled, fv_images, eval_images, settings) -> dict:
        from .evaluate import gate_fraction

        return {"gate_on_manipulated_fvs": gate_fraction(fooled, fv_images),
                "gate_on_eval_naturals": gate_fraction(fooled, eval_images, transform_seed=None)}

    def summary(self, details, prepared, settings) -> dict:
        pic = prepared.heldout_picture
        return {"detector_heldout_accuracy": prepared.heldout.accuracy,
                "detector_heldout_picture_recall": pic.fv_recall if pic is not None else None}

    def figure_note(self, summary) -> str:
        return f"detector held-out acc. {_pct(summary.get('detector_heldout_accuracy'))}"

    def ineffective_hint(self, details, prepared, settings) -> str:
        learned = set(getattr(prepared, "train_units", []) or [])  # routed, shared and drawn units
        units = [u["unit"] for u in details.get("effect", {}).get("units", [])]
        gate = details.get("gate_on_manipulated_fvs")
        gate = gate.get("open_fraction") if isinstance(gate, dict) else gate
        if settings.det_routed_seeds == 0:
            return "raise --det-routed-seeds (now 0: the detector never saw the manipulated units' FVs)"
        if any(u not in learned for u in units):
            return (f"raise --det-routed-units (now {settings.det_routed_units}: the detector did not learn every "
                    f"evaluated unit's FVs)")
        if gate is not None and gate >= 0.5:
            return f"raise --eval-steps (the gate is open on {_pct(gate)} of the manipulated FVs)"
        return f"raise --det-routed-seeds (now {settings.det_routed_seeds})"


@dataclass(frozen=True)
class SilentSettings(MethodSettings):
    """Silent units (:func:`~fvsanity.fool.build_silent_units`): ``silent_mode`` ``trigger`` (a
    channel that fires once the pooled unit or its target leaves its natural range, then driven
    by the target; ``silent_offset``, ``silent_width``) or ``filter`` (the paper's orthogonal
    filter, target weight ``lam``); ``strength`` weighs the silent channel; the firing level
    sits at the larger of calibration max + ``silent_margin_sd`` sd and mean +
    ``silent_margin_range`` x (max - mean)."""

    lam: float = setting(3.0, "weight of the target in the silent channel (filter mode)")
    strength: float = setting(100.0, "weight of the silent channel", gt=0)
    silent_margin_sd: float = setting(1.0, "firing level at least calibration max + this many sd", min=0)
    silent_margin_range: float = setting(4.0, "firing level = calibration mean + this x (max - mean), at least max + "
                                              "--silent-margin-sd sd")
    silent_mode: str = setting("trigger", "'filter' = the paper's orthogonal filter on the layer input; 'trigger' = "
                                          "fires when the pooled unit or its target leaves its natural range, then "
                                          "the target drives it", choices=("filter", "trigger"))
    silent_offset: float = setting(10.0, "trigger mode: added to the standardized target drive")
    silent_width: float = setting(10.0, "trigger mode: ramp width of the trigger, in sd", gt=0)


@register_manipulation
class SilentUnits(Manipulation):
    """Silent units (the paper's second construction): a channel that is exactly zero on the
    calibration images takes over the unit's FV."""

    name = "silent"
    help = "silent units: a parallel channel, zero on natural images, that dominates the FV"
    Settings = SilentSettings

    def build(self, lm, routes, train_images, settings, *, prepared=None):
        from .silent import build_silent_units

        return build_silent_units(lm, routes, train_images, lam=settings.lam, strength=settings.strength,
                                  margin_sd=settings.silent_margin_sd, margin_range=settings.silent_margin_range,
                                  mode=settings.silent_mode, offset=settings.silent_offset, width=settings.silent_width)

    def natural_diagnostics(self, fooled, eval_images, train_images, settings) -> dict:
        from .silent import silent_zero_fraction

        return {"silent_zero_eval": silent_zero_fraction(fooled, eval_images),
                "silent_zero_calibration": silent_zero_fraction(fooled, train_images)}

    def fv_diagnostics(self, fooled, fv_images, eval_images, settings) -> dict:
        from .silent import silent_zero_fraction

        return {"silent_fired_on_manipulated_fvs": 1.0 - silent_zero_fraction(fooled, fv_images)["fraction"]}

    def summary(self, details, prepared, settings) -> dict:
        return {"silent_zero_fraction_eval": details["silent_zero_eval"]["fraction"]}

    def figure_note(self, summary) -> str:
        return f"silent on held-out naturals {_pct(summary.get('silent_zero_fraction_eval'))}"

    def ineffective_hint(self, details, prepared, settings) -> str:
        fired = details.get("silent_fired_on_manipulated_fvs")
        if fired is not None and fired < 0.5 and settings.silent_mode == "trigger":
            return (f"lower --silent-margin-range (now {settings.silent_margin_range:g}; the silent channel fired on "
                    f"{_pct(fired)} of the manipulated FVs; ResNet-20 needs 1.25 with --silent-offset 2 --silent-width 1)")
        return f"raise --strength (now {settings.strength:g})"
