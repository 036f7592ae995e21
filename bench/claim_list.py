"""The claims ``mmfuse bench claims`` tests (``bench/claims.py``): per seed method, its task, its arms (the method,
its one-switch ablations, the baselines), the effects that make its claim, and the columns shown beside each arm;
and the choices made after a result of the benchmark was seen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.claim_stats import Effect

BASELINES = ("late", "early", "mult")


@dataclass(frozen=True)
class Arm:
    label: str  # row label, e.g. "mim[gates off]"
    model: str  # fusion.MODELS name
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Claim:
    key: str  # --claims name
    title: str
    task: str  # bench.claim_tasks.TASKS name
    arms: tuple[Arm, ...]
    effects: tuple[Effect, ...]
    probes: tuple[tuple[str, str], ...] = ()  # (modality, latent): linear probe R^2 of the frozen z_m
    columns: tuple[str, ...] = ()  # the claim's own measures and mechanism diagnostics, shown beside each arm


def _with_baselines(*arms: Arm) -> tuple[Arm, ...]:
    return (*arms, *(Arm(name, name) for name in BASELINES if name not in {a.label for a in arms}))


# both TCMax claims (classification and regression) ask whether the weak audio branch learns its signal
TC_AUDIO_PROBE = Effect(
    "audio branch learns its unique signal (probe R² of z_audio on s2), TCMax − late", "probe/audio/s2", "tcmax", "late"
)
TC_COLUMNS = ("probe/audio/s2", "probe/text/s1", "grad_share/product_negative", "tc", "dv_joint")
CLAIMS = (
    Claim(
        "tcmax",
        "TCMax: maximising total correlation counters modality competition (classification, as published)",
        "competition_classes",
        _with_baselines(
            Arm("tcmax", "tcmax"),
            Arm("tcmax[TC off]", "tcmax", {"tc_weight": 0.0}),
            Arm("tcmax[share head]", "tcmax", {"head": "share"}),
        ),
        (
            Effect("test accuracy, TCMax − late", "accuracy", "tcmax", "late"),
            Effect("test accuracy, TCMax − TC off (the TC term alone)", "accuracy", "tcmax", "tcmax[TC off]"),
            TC_AUDIO_PROBE,
        ),  # fmt: skip
        probes=(("audio", "s2"), ("text", "s1")),
        columns=TC_COLUMNS,
    ),
    Claim(
        "tcmax_regression",
        "TCMax for regression (the bound on binned labels beside a regression head): the same competition",
        "competition",
        _with_baselines(
            Arm("tcmax", "tcmax"),
            Arm("tcmax[TC off]", "tcmax", {"tc_weight": 0.0}),
            Arm("tcmax[constant_normaliser]", "tcmax", {"regression": "constant_normaliser"}),
            Arm("tcmax[bins]", "tcmax", {"regression": "bins"}),
        ),
        (
            Effect("test MAE, late − TCMax", "mae", "tcmax", "late", lower_is_better=True),
            Effect("test MAE, TC off − TCMax (the TC term alone)", "mae", "tcmax", "tcmax[TC off]", True),
            TC_AUDIO_PROBE,
        ),  # fmt: skip
        probes=(("audio", "s2"), ("text", "s1")),
        columns=TC_COLUMNS,
    ),
    Claim(
        "mim",
        "MIM: purification gates close on noise steps and help",
        "purification",
        _with_baselines(
            Arm("mim", "mim"),
            Arm("mim[gates off]", "mim", {"gates": False}),
            # chosen after the published setting's gates were seen not to move: gates start at the threshold under
            # a 10x L0 penalty, to tell "the mechanism cannot work" from "it cannot start"
            Arm("mim[loc_bias 0, penalty 1]", "mim", {"loc_bias": 0.0, "penalty_weight": 1.0}),
        ),
        (
            Effect("video gate rate, clean − noisy steps (published gate settings)", "gate_gap", "mim"),
            Effect("test MAE, gates off − MIM", "mae", "mim", "mim[gates off]", lower_is_better=True),
            Effect(
                "MAE area as Gaussian noise on video rises, gates off − MIM",
                "noise_auc/video",
                "mim",
                "mim[gates off]",
                lower_is_better=True,
            ),
            Effect(
                "video gate rate, clean − noisy steps (gates start at the threshold)",
                "gate_gap",
                "mim[loc_bias 0, penalty 1]",
            ),
            Effect(
                "test MAE, gates off − MIM (gates start at the threshold)",
                "mae",
                "mim[loc_bias 0, penalty 1]",
                "mim[gates off]",
                lower_is_better=True,
            ),
        ),  # fmt: skip
        columns=(
            "gate_rate/video_clean",
            "gate_rate/video_noisy",
            "grad_share/purified",
            "grad_share/penalty",
            "purify_gain/video",
            "noise_auc/video",
        ),  # fmt: skip
    ),
    Claim(
        "ithp",
        "ITHP: the information bottleneck resists a nuisance that shifts at test time",
        "nuisance",
        _with_baselines(Arm("ithp", "ithp"), Arm("ithp[no bottleneck]", "ithp", {"bottleneck": False})),
        (
            Effect("test MAE under the shift, no bottleneck − ITHP", "mae", "ithp", "ithp[no bottleneck]", True),
            Effect(
                "MAE area as Gaussian noise on text rises, no bottleneck − ITHP",
                "noise_auc/text",
                "ithp",
                "ithp[no bottleneck]",
                True,
            ),
        ),  # fmt: skip
        columns=("kl0", "kl1", "grad_share/kl0", "grad_share/kl1", "noise_auc/text"),
    ),
    Claim(
        "bc_pmjrs",
        "BC-PMJRS: MI-min removes redundancy; MI-max with LTP/LTD improves the prediction",
        "redundancy",
        _with_baselines(
            Arm("bc_pmjrs", "bc_pmjrs"),
            Arm("bc_pmjrs[no MI]", "bc_pmjrs", {"mi_min": False, "mi_max": False}),
            Arm("bc_pmjrs[MI-min only]", "bc_pmjrs", {"mi_max": False}),
            Arm("bc_pmjrs[MI-max only]", "bc_pmjrs", {"mi_min": False}),
        ),
        (
            Effect(
                "linear-Gaussian I(u_text; u_audio) in nats, MI-max only − full (MI-min lowers it)",
                "mi_linear/text-audio",
                "bc_pmjrs",
                "bc_pmjrs[MI-max only]",
                lower_is_better=True,
            ),
            Effect(
                "held-out InfoNCE I(u_text; u_audio) in nats, MI-max only − full (MI-min lowers it)",
                "mi_infonce/text-audio",
                "bc_pmjrs",
                "bc_pmjrs[MI-max only]",
                lower_is_better=True,
            ),
            Effect("test MAE, no MI − full", "mae", "bc_pmjrs", "bc_pmjrs[no MI]", lower_is_better=True),
            Effect("test MAE, MI-min only − full", "mae", "bc_pmjrs", "bc_pmjrs[MI-min only]", lower_is_better=True),
            Effect("test MAE, MI-max only − full", "mae", "bc_pmjrs", "bc_pmjrs[MI-max only]", lower_is_better=True),
        ),  # fmt: skip
        columns=(
            "mi_linear/text-audio",
            "mi_infonce/text-audio",
            "mi/text-audio",
            "grad_share/mi_min",
            "grad_share/mi_max",
        ),  # fmt: skip
    ),
)
# Choices made after a result of this benchmark was seen; the report lists them under the table.
AFTER_THE_FACT = (
    "TCMax's regression form (`bins_head`) and its earlier default (`gaussian`, now `constant_normaliser`) were "
    "chosen on the `competition` task's validation MAE, the benchmark these rows come from.",
    "The MIM arm `loc_bias 0, penalty 1` was added after the published setting's gates were seen not to move.",
    "The classification task `competition_classes` and the TC-off ablations were added after the regression-only "
    "rows had been run.",
    "The reported redundancy measure (linear-Gaussian and held-out InfoNCE) replaced the re-fitted CLUB after CLUB "
    "was seen to read far above the task's cap.",
)
