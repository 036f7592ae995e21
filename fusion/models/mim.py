"""MIM (Zeng, Mai, Yan, Hu, IEEE TMM 2023): unimodal purification (UPN) + knowledge-guided supervision (KGS).

Per modality m: x_m (B, T, D_m) -> ``SequenceEncoder`` -> h_m (B, T, H); unmasked vector u_m = masked mean of
tanh(h_m) (B, H). The UPN mask learner (BiLSTM over h_m up to the last valid step, as if packed, then a
per-step scorer MLP) gives logits alpha_m (B, T). A Hard-Concrete gate per step (Louizos et al. 2018):

    training: u ~ U(1e-6, 1 - 1e-6), s = sigmoid((log u - log(1 - u) + alpha + loc_bias) / beta);
    eval:     s = sigmoid((alpha + loc_bias) / beta) (u = 1/2: deterministic);
    soft = clip(s * (zeta - gamma) + gamma, 0, 1), gate = 1[soft > threshold] forward, d soft backward
    (straight-through); gate = 0 at padding steps.

Purified vector p_m = sum over valid steps of tanh(gate * h_m) / number of valid steps (B, H). One head
Linear(H -> out) per modality, shared: y_m^u = head_m(u_m), y_m^p = head_m(p_m). Fusion: "multiplication"
ŷ = Linear(tanh(Linear(prod_m p_m))) with a missing modality contributing 1; "add" sums the present p_m.

Losses (named, already weighted; "modalities" below are those some sample of the batch has):

- ``task``: task loss of ŷ (L1 for regression, cross-entropy, or binary cross-entropy);
- ``unimodal``: unimodal_weight * sum_m task loss of y_m^u over the samples that have m;
- ``purified``: purified_weight * sum_m task loss of y_m^p, computed on a branch where h_m is detached and
  the head is called with ``frozen_call``: its gradient reaches only the UPN mask learners;
- ``penalty``: penalty_weight * sum_m of the L0 penalty, the mean over valid steps of
  sigmoid(alpha + loc_bias - beta * log(-gamma / zeta)) (UPN only by construction; methods.md 5.3:
  0.1 * (penalty_l + penalty_a + penalty_v));
- ``intra``: intra_weight * sum_m MSE of the worse branch (y_m^p or y_m^u, by this batch's task loss) toward
  the better one, detached;
- ``inter``: inter_weight * 1/2 (inter_temp * a_t)^2 * sum_{s != t} KL(softmax(p_t.detach()) || softmax(p_s))
  (batchmean over the samples with both), t = the modality with the lowest purified loss, and
  a_m = M prod_{n != m}(1 + l_n) / sum_k prod_{n != k}(1 + l_n), l_m = L_{p,m} / sum_n L_{p,n} (detached):
  the weights sum to M and a lower loss gives a larger weight. With fewer than two modalities the key holds
  a zero that is still connected to the graph, so the loss keys never change between batches.

The selection (which modalities some sample has, which branch is better, the teacher) is made with tensor ops
(``torch.where``, a masked argmin), not Python branches: no host sync, one graph under ``torch.compile``. A
modality no sample has adds exact zeros, so the losses are the same as leaving it out.

Optimiser groups: "upn" (mask learners) and "model" (everything else). One backward of the summed losses
gives "model" exactly the gradient of task + unimodal + intra + inter; "upn" gets purified + penalty and, as
the published second optimiser step (over all parameters) did, the model losses that reach it through the
gates.

Diagnostics (detached): ``gate_rate/<m>`` (fraction of valid steps kept), ``gates/<m>`` (B, T) (0 at padding),
``loss_u/<m>``, ``loss_p/<m>`` (0 for a modality no sample has), ``inter_weight/<m>`` (with two or more
modalities in the model; 0 for a modality no sample has) and ``teacher`` (index into the model's modalities;
-1 when fewer than two are present). Departures from the published code (zengy268/MIM @ 08df574, see
reference/methods.md §5):

- one forward and one backward instead of two Adam steps and six backward calls over a stale graph;
- the mask learner reads h_m detached, so the encoder gets no gradient through the mask learner's input;
- the MLP across time (T -> T/5 -> T) is omitted: it needs a fixed length and our sequences vary; the
  scorer's final ReLU is dropped too, so alpha can go negative and gates can close at eval;
- the penalty and the purified mean run over valid steps (the published code averages over padding too);
- gates are deterministic at eval. ``faithful=True`` restores the published sampled (stochastic) gates at eval;
- the Hard-Concrete noise and gates, and the mask learner's BiLSTM, are computed in float32 whatever the
  autocast dtype (bf16 would quantise the noise to 8 bits).

Ablation: ``gates=False`` removes purification and nothing else. The mask learners are still built (from one seed
MIM and its ablation start with identical weights) but never run, and the Hard-Concrete noise is still drawn (the
random streams stay paired). Every valid step is kept (gate = 1): p_m is then the tanh-mean u_m, so y_p = y_u and
the intra-modal term is exactly 0, and the inter-modal term is the one MIM computes when its gates are all open.
``purified`` and ``penalty`` are zeros still connected to the graph (the loss keys stay the same). Against MIM
with every gate open the losses differ in ``purified`` and ``penalty`` only (tests/fusion/test_ablations.py);
where MIM's gates close steps, its task, intra and inter terms differ through p_m: that is the mechanism.
The claims benchmark compares MIM against it.

Finding: at the published gate settings the gates never move. On the claims benchmark's purification task (video
steps half noise; seeds 0-2, 400 steps, gate rates and MAE on the validation split) the video gates keep 1.000 of
clean and of noisy steps for loc_bias in {0, 1, 2, 3} with penalty_weight 0.01 or 0.1, for loc_bias {0, 1} with
0.3 or 0.5, and for loc_bias 0 with 0.7: once the clipped soft gate saturates at 1 neither the straight-through
gradient nor the penalty's sigmoid moves it, and the validation MAE stays at 0.28-0.32 (0.29 with the gates
off). The gates only move past a cliff in the penalty: at 0.85 (loc_bias 0) they keep 0.77-0.98 of clean and
0.26-0.81 of noisy video steps, at 1.0 (loc_bias 0, 1 or 2) 0.58-0.90 and 0.06-0.53, but they also close 25-50 %
of the text steps and the validation MAE rises to 0.35-0.40 and 0.42-0.50. No setting tried keeps the gates
working without that cost, so the default stays the published one, and this is a stated deviation: on that task
MIM's default runs without purification, as the claims table shows. The cause is measured there too
(``purify_gain/video``, from ``purified_loss``): on the trained model, closing exactly the noise steps by hand
raises the purified video loss in all 10 seeds (by 0.041 +- 0.028), so the loss the gates are trained on has no
descent toward purification. The transformer encoder has spread the clean steps' signal over every step and the
head is fitted to the pooled mean of all of them.

Mechanism, measured at every evaluation: the gate rates per modality (``gate_rate/<m>``; with
``gate_rate/<m>_noisy`` and ``gate_rate/<m>_clean`` where the batch marks the noise steps in ``<m>_noisy``) and
the gradient shares of ``purified`` and ``penalty`` (``FusionModel.mechanism``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.base import FusionConfig, FusionModel, FusionOutput, Inputs
from fusion.estimators.critics import full_precision
from fusion.layers import OutputLinear, SequenceEncoder, frozen_call, last_valid_length, masked_mean, task_loss

FUSIONS = ("multiplication", "add")


@dataclass
class MIMConfig(FusionConfig):
    beta: float = 1 / 3  # Hard-Concrete temperature
    gamma: float = -0.2  # lower end of the stretch interval (< 0)
    zeta: float = 1.0  # upper end of the stretch interval
    loc_bias: float = 3.0  # added to the gate logits: gates start open
    threshold: float = 0.6  # forward gate = 1 where the clipped soft gate exceeds this
    penalty_weight: float = 0.1  # weight of the L0 penalty
    inter_temp: float = 10.0  # scales the inter-modal KL (not a softmax temperature)
    fusion: str = "multiplication"  # multiplication | add
    unimodal_weight: float = 1.0  # weight of each modality's own prediction loss
    purified_weight: float = 1.0  # weight of the purified (gated) representations' prediction loss
    intra_weight: float = 1.0  # weight of the intra-modal guidance term (KGS)
    inter_weight: float = 1.0  # weight of the inter-modal KL term (KGS)
    gates: bool = True  # ablation switch: False = no purification (every valid step kept, no mask learner)

    def problems(self) -> list[str]:
        out = super().problems()
        if self.beta <= 0:
            out.append(f"beta: must be > 0, got {self.beta}")
        if not self.gamma < 0 < self.zeta:
            out.append(f"gamma ({self.gamma}) must be < 0 and zeta ({self.zeta}) > 0")
        if not 0.0 < self.threshold < 1.0:
            out.append(f"threshold: must be in (0, 1), got {self.threshold}")
        if self.fusion not in FUSIONS:
            out.append(f"fusion: must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        for key in (
            "penalty_weight",
            "inter_temp",
            "unimodal_weight",
            "purified_weight",
            "intra_weight",
            "inter_weight",
        ):
            if getattr(self, key) < 0:
                out.append(f"{key}: must be >= 0, got {getattr(self, key)}")
        return out


def hard_concrete_gate(alpha: Tensor, mask: Tensor, config: MIMConfig, u: Tensor | None = None) -> Tensor:
    """Straight-through Hard-Concrete gate (B, T) from logits alpha (B, T): exactly 0/1 forward, the clipped
    soft gate's gradient backward, 0 at invalid steps. ``u`` (B, T) in (0, 1) is the noise; None = u = 1/2."""
    logits = alpha + config.loc_bias
    if u is not None:
        logits = logits + torch.log(u) - torch.log1p(-u)
    soft = (torch.sigmoid(logits / config.beta) * (config.zeta - config.gamma) + config.gamma).clamp(0.0, 1.0)
    hard = (soft > config.threshold).to(soft.dtype)
    return (hard + (soft - soft.detach())) * mask.to(soft.dtype)  # bracketed: the forward value stays exact


def l0_penalty(alpha: Tensor, mask: Tensor, config: MIMConfig) -> Tensor:
    """Mean over valid steps of P(gate != 0) = sigmoid(alpha + loc_bias - beta log(-gamma / zeta)) -> 0-dim."""
    shift = config.loc_bias - config.beta * math.log(-config.gamma / config.zeta)
    weights = mask.to(alpha.dtype)
    return (torch.sigmoid(alpha + shift) * weights).sum() / weights.sum().clamp_min(1.0)


def inter_weights(losses: Tensor, active: Tensor | None = None) -> Tensor:
    """KGS weights (M,) from purified losses (M,): a_m = M prod_{n!=m}(1+l_n) / sum_k prod_{n!=k}(1+l_n),
    l = losses / sum(losses). They sum to M; a lower loss gets a larger weight. ``active`` (M,) bool: only
    these modalities take part (M counts them, n and k run over them; the others get weight 0); None = all."""
    if active is None:
        active = torch.ones(losses.shape, dtype=torch.bool, device=losses.device)
    losses = torch.where(active, losses, torch.zeros_like(losses))
    lam = torch.where(active, 1.0 + losses / losses.sum().clamp_min(1e-12), torch.ones_like(losses))
    others = torch.stack([torch.cat([lam[:k], lam[k + 1 :]]).prod() for k in range(len(lam))])
    others = others * active.to(others.dtype)
    return active.sum().to(others.dtype) * others / others.sum().clamp_min(1e-12)  # the sum is >= 1 if any


def gate_rates(m: str, gates: Tensor, mask: Tensor, noisy: Tensor | None) -> dict[str, Tensor]:
    """``gate_rate/<m>`` (kept fraction of valid steps), ``gates/<m>`` (B, T) and, when the batch marks the noise
    steps (``<m>_noisy`` (B, T) bool, as the synthetic tasks do), ``gate_rate/<m>_noisy`` / ``gate_rate/<m>_clean``
    over the valid steps of each kind (0 where there are none)."""
    out = {f"gate_rate/{m}": (gates.sum() / mask.sum().clamp_min(1)).float(), f"gates/{m}": gates}
    if noisy is not None and noisy.shape == mask.shape:
        for name, steps in (("noisy", noisy & mask), ("clean", mask & ~noisy)):
            out[f"gate_rate/{m}_{name}"] = ((gates * steps).sum() / steps.sum().clamp_min(1)).float()
    return out


class MaskedBiLSTM(nn.Module):
    """One-layer BiLSTM over each sample's steps up to its last valid one, without packing.

    Same parameters (names, shapes, initialisation) as ``nn.LSTM(in_dim, hidden, batch_first=True,
    bidirectional=True)`` and, at steps before the last valid one, the same outputs as running it on the
    packed sequence; 0 after. The forward direction runs over the padded batch (trailing padding comes after
    every step that matters); the backward direction runs forward over each sample's steps reversed in place
    (a gather built from the mask), and its outputs are reversed back. No host sync, so it compiles; Dynamo
    would not trace an ``nn.LSTM`` module (``allow_rnn``), this module calls the ``torch.lstm`` op itself.
    """

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden_size = hidden
        reference = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=True)  # its initialisation
        for name, param in reference.named_parameters():
            self.register_parameter(name, param)

    def _direction(self, x: Tensor, suffix: str) -> Tensor:
        weights = [getattr(self, f"{kind}_l0{suffix}") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        x = x.float()
        zeros = x.new_zeros(1, x.shape[0], self.hidden_size)
        with full_precision(x.device):  # fp32 under any autocast (CPU's oneDNN has no fp16 LSTM)
            return torch.lstm(
                x, (zeros, zeros), [w.float() for w in weights], True, 1, 0.0, self.training, False, True
            )[0]

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (B, T, D), mask (B, T) -> (B, T, 2 * hidden)."""
        lengths = last_valid_length(mask)[:, None]  # (B, 1)
        steps = torch.arange(x.shape[1], device=x.device)[None]
        inside = steps < lengths
        order = torch.where(inside, lengths - 1 - steps, steps)  # reverses steps < length; its own inverse
        gather = order[..., None]
        backward = self._direction(x.gather(1, gather.expand(-1, -1, x.shape[2])), "_reverse")
        backward = backward.gather(1, gather.expand(-1, -1, backward.shape[2]))
        out = torch.cat([self._direction(x, ""), backward], -1)
        return out * inside[..., None].to(out.dtype)


class MaskLearner(nn.Module):
    """UPN mask learner: BiLSTM over h (B, T, H) up to the last valid step, then a per-step scorer -> (B, T)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        half = (hidden + 1) // 2
        self.lstm = MaskedBiLSTM(hidden, half)
        self.scorer = nn.Sequential(nn.Linear(2 * half, half), nn.ReLU(), nn.Linear(half, 1))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        return self.scorer(self.lstm(h, mask)).squeeze(-1)


def _masked_mse(prediction: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Mean squared error averaged over outputs and over the samples with ``weight`` (B,) -> 0-dim."""
    per_sample = (prediction - target).pow(2).reshape(len(prediction), -1).mean(1)
    weight = weight.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


class MIM(FusionModel):
    Config = MIMConfig
    # purification (its terms' gradient shares and the gate rates) and the knowledge-guided terms
    mechanism_keys = ("grad_share/purified", "grad_share/penalty", "grad_share/intra", "grad_share/inter",
                      "diag/gate_rate/*")  # fmt: skip

    @property
    def uses_every_parameter(self) -> bool:  # type: ignore[override]
        """True with gates (missing modalities are masked, never skipped); ``gates=False`` leaves the UPN unused."""
        return self.config.gates

    def __init__(self, config: MIMConfig) -> None:
        super().__init__(config)
        c = config
        self.encoders = nn.ModuleDict(
            {m: SequenceEncoder(c.dims[m], c.hidden, c.num_layers, c.num_heads, c.dropout) for m in self.modalities}
        )
        self.upn = nn.ModuleDict({m: MaskLearner(c.hidden) for m in self.modalities})
        self.heads = nn.ModuleDict({m: OutputLinear(c.hidden, c.out_dim) for m in self.modalities})
        self.fusion_proj = nn.Linear(c.hidden, c.hidden)
        self.fusion_out = OutputLinear(c.hidden, c.out_dim)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Two groups: "upn" (the mask learners: purified + penalty + model losses through the gates), "model"."""
        upn = [p for p in self.upn.parameters() if p.requires_grad]
        ids = {id(p) for p in upn}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"name": "upn", "params": upn, "lr": lr}, {"name": "model", "params": rest, "lr": lr}]

    def forward(self, batch: dict[str, Tensor]) -> FusionOutput:
        inputs = self.prepare(batch)
        c = self.config
        sample_gates = self.training or c.faithful
        pooled, y_u, y_p, y_upn, penalties, gates = {}, {}, {}, {}, {}, {}
        for m in self.modalities:
            mask = inputs.masks[m]
            h = self.encoders[m](inputs.feats[m], mask)
            # drawn with the gates off too, so that an ablation consumes the same random numbers as MIM
            u = torch.rand(mask.shape, device=h.device) * (1 - 2e-6) + 1e-6 if sample_gates else None
            if c.gates:
                alpha = self.upn[m](h.detach(), mask).float()  # gates in fp32 under any autocast dtype
                gate = hard_concrete_gate(alpha, mask, c, u).to(h.dtype)
                penalties[m] = l0_penalty(alpha, mask, c)
            else:  # ablation: no purification
                gate = mask.to(h.dtype)
                penalties[m] = h.sum() * 0.0
            count = mask.sum(1, keepdim=True).clamp_min(1).to(h.dtype)
            pooled[m] = torch.tanh(gate[..., None] * h).sum(1) / count  # gate = 0 at padding: tanh(0) = 0
            upn_pooled = torch.tanh(gate[..., None] * h.detach()).sum(1) / count
            y_u[m] = self._squeeze(self.heads[m](masked_mean(torch.tanh(h), mask)))
            y_p[m] = self._squeeze(self.heads[m](pooled[m]))
            y_upn[m] = self._squeeze(frozen_call(self.heads[m], upn_pooled))  # same value as y_p, UPN-only grad
            gates[m] = gate
        prediction = self._squeeze(self.fusion_out(torch.tanh(self.fusion_proj(self._fuse(pooled, inputs.present)))))

        diagnostics: dict[str, Tensor] = {}
        for m in self.modalities:
            diagnostics.update(gate_rates(m, gates[m].detach(), inputs.masks[m], batch.get(f"{m}_noisy")))
        losses: dict[str, Tensor] = {}
        if inputs.label is not None:
            losses = self._losses(prediction, inputs, pooled, y_u, y_p, y_upn, penalties, diagnostics)
        return FusionOutput(prediction, losses, diagnostics)

    @torch.no_grad()
    def purified_loss(self, batch: dict[str, Tensor], m: str, keep: Tensor) -> Tensor:
        """Task loss of modality ``m``'s purified prediction with the gates set by hand to ``keep`` (B, T) bool
        instead of the mask learner's: the head on the sum over kept valid steps of tanh(h) divided by the number
        of valid steps, as ``forward`` pools. With ``keep`` = the noise-free steps this is the loss a perfect
        purifier would reach; with every valid step kept it is the loss with the gates open (0-dim)."""
        inputs = self.prepare(batch)
        mask = inputs.masks[m]
        h = self.encoders[m](inputs.feats[m], mask)
        gate = (keep & mask).to(h.dtype)
        pooled = torch.tanh(gate[..., None] * h).sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(h.dtype)
        return task_loss(self._squeeze(self.heads[m](pooled)), inputs.label, self.config.task, inputs.present[m])

    def _squeeze(self, out: Tensor) -> Tensor:
        return out.squeeze(-1) if self.config.task == "regression" else out

    def _fuse(self, pooled: dict[str, Tensor], present: dict[str, Tensor]) -> Tensor:
        """(B, H) fused vector: product of the present purified vectors (missing = 1) or their sum."""
        if self.config.fusion == "multiplication":
            fused = torch.ones_like(next(iter(pooled.values())))
            for m, p in pooled.items():
                fused = fused * torch.where(present[m][:, None], p, torch.ones_like(p))
            return fused
        return sum(p * present[m][:, None].to(p.dtype) for m, p in pooled.items())

    def _losses(
        self,
        prediction: Tensor,
        inputs: Inputs,
        pooled: dict[str, Tensor],
        y_u: dict[str, Tensor],
        y_p: dict[str, Tensor],
        y_upn: dict[str, Tensor],
        penalties: dict[str, Tensor],
        diagnostics: dict[str, Tensor],
    ) -> dict[str, Tensor]:
        """The named, weighted losses; per-modality unimodal / purified losses and the inter-modal teacher go
        into ``diagnostics``. Tensor ops only (no host sync): a modality no sample has contributes exact zeros
        (its masked losses, MSE and penalty are 0) instead of being left out, which gives the same values."""
        c, label, present = self.config, inputs.label, inputs.present
        zero = prediction.sum() * 0.0  # connected to the graph, so every key always backpropagates
        loss_u = {m: task_loss(y_u[m], label, c.task, present[m]) for m in self.modalities}
        loss_p = {m: task_loss(y_upn[m], label, c.task, present[m]) for m in self.modalities}
        intra = zero
        for m in self.modalities:  # the better branch in this batch teaches the other
            diagnostics[f"loss_u/{m}"] = loss_u[m].detach()
            diagnostics[f"loss_p/{m}"] = loss_p[m].detach()
            better_purified = loss_p[m].detach() < loss_u[m].detach()
            student = torch.where(better_purified, y_u[m], y_p[m])
            teacher = torch.where(better_purified, y_p[m], y_u[m])
            intra = intra + _masked_mse(student, teacher.detach(), present[m])
        losses = {
            "task": task_loss(prediction, label, c.task),
            "unimodal": c.unimodal_weight * sum(loss_u.values(), zero),
            "purified": c.purified_weight * (sum(loss_p.values(), zero) if c.gates else zero),  # UPN only
            "penalty": c.penalty_weight * torch.stack([penalties[m] for m in self.modalities]).sum(),
            "intra": c.intra_weight * intra,
            "inter": c.inter_weight * self._inter(pooled, present, loss_p, diagnostics, zero),
        }
        return losses

    def _inter(
        self,
        pooled: dict[str, Tensor],
        present: dict[str, Tensor],
        loss_p: dict[str, Tensor],
        diagnostics: dict[str, Tensor],
        zero: Tensor,
    ) -> Tensor:
        """Inter-modal KGS (unweighted) over the modalities some sample has; ``zero`` with fewer than two. The
        teacher (lowest purified loss) is chosen by a masked argmin and the KL terms are selected by mask."""
        names = self.modalities
        active = torch.stack([present[m].any() for m in names])  # (M,) some sample has m
        lp = torch.stack([loss_p[m].detach() for m in names])
        weights = inter_weights(lp, active)
        t = torch.where(active, lp, torch.full_like(lp, math.inf)).argmin().reshape(1)  # index_select, no sync
        target = torch.stack([pooled[m] for m in names]).index_select(0, t)[0].detach().float().softmax(-1)
        teacher_present = torch.stack([present[m] for m in names]).index_select(0, t)[0]
        kl = zero
        for i, s in enumerate(names):
            both = (teacher_present & present[s]).to(target.dtype)
            per_sample = F.kl_div(pooled[s].float().log_softmax(-1), target, reduction="none").sum(-1)
            term = (per_sample * both).sum() / both.sum().clamp_min(1.0)
            kl = kl + torch.where(active[i] & (t[0] != i), term, zero)  # adding an exact 0 leaves the sum as it is
        enough = active.sum() >= 2
        diagnostics["teacher"] = torch.where(enough, t[0], -1).float()
        if len(names) >= 2:
            for i, m in enumerate(names):
                diagnostics[f"inter_weight/{m}"] = weights[i]
        return torch.where(enough, 0.5 * (self.config.inter_temp * weights.index_select(0, t)[0]) ** 2 * kl, zero)
