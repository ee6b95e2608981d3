"""Every unlearning method's hyperparameters (a frozen pydantic model, spec defaults) and what its
context must serve (`NEEDS`), importable without torch: identities of unlearn stages hash these
(defaults included, decision 15), and `oracle-farm status` computes them without loading a method.
Each method's module (`pipeline/unlearn/<name>.py`) re-exports its class as `Config` beside `run`;
the comments there and here say where each default comes from."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MatchingConfig(MethodConfig):
    """Defaults: the DMM configuration used with the U-LiRA runs (`run_ulira_unlearnings.py`)."""

    lr: float = Field(1e-4, gt=0)  # Adam learning rate of the first epoch
    lr_decay: float = Field(0.95, gt=0, le=1)  # ExponentialLR factor, applied once per epoch
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(512, ge=1)
    forget_multiplier: float = Field(5.0, ge=0)  # r_f: copies of the forget set
    retain_multiplier: float = Field(20.0, ge=0)  # r_r: retain points = floor(r_r * |F|), capped at |retain|
    shuffle: bool = True  # reshuffle the index set every epoch (True in the reference's U-LiRA config)
    # At least this many optimizer steps, whatever |F|: when epochs x batches per epoch falls short, every
    # epoch makes ceil(min_steps / (epochs x batches)) reshuffled passes over the index set at that epoch's
    # lr (the x0.95 decay stays per epoch). 0 = the reference, whose step count shrinks with |F|.
    min_steps: int = Field(0, ge=0)


# ---------------------------------------------------------------------------------------- do_nothing
class DoNothing(MethodConfig):
    pass


# ---------------------------------------------------------------------------------------- finetune
class Finetune(MethodConfig):
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: per step, down to 0 at the end


# ---------------------------------------------------------------------------------------- gradient_ascent
class GradientAscent(MethodConfig):
    lr: float = Field(1e-3, gt=0)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(64, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)


# ---------------------------------------------------------------------------------------- neggrad_plus
class NeggradPlus(MethodConfig):
    lr: float = Field(1e-2, gt=0)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(128, ge=1)  # retain batches; one step per retain batch
    forget_batch_size: int = Field(128, ge=1)
    retain_weight: float = Field(0.99, ge=0)  # alpha in the DEL code
    forget_weight: float = Field(0.01, ge=0)  # 1 - alpha
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


# ---------------------------------------------------------------------------------------- scrub
class Scrub(MethodConfig):
    lr: float = Field(1e-2, gt=0)
    epochs: int = Field(10, ge=1)
    msteps: int = Field(3, ge=0)  # epochs (from the first) that start with a max pass over the forget set
    forget_batch_size: int = Field(32, ge=1)
    batch_size: int = Field(64, ge=1)  # retain batches
    gamma: float = Field(0.99, ge=0)  # CE weight of the min steps
    alpha: float = Field(0.1, ge=0)  # KL weight of the min steps
    temperature: float = Field(4.0, gt=0)
    lr_decay_epochs: tuple[int, ...] = (3, 5, 9)  # in a grid, one value is a nested list: [[3, 5, 9]]
    lr_decay_rate: float = Field(0.1, gt=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)


# ---------------------------------------------------------------------------------------- dm_direct
class DmDirect(MethodConfig):
    multiplier: float = Field(1.0)  # m_mult: scale of the summed datamodel correction
    diagonal_only: bool = False  # keep only theta[i, i, :] for i in F


# ---------------------------------------------------------------------------------------- oracle_matching
class OracleMatching(MatchingConfig):
    pass


# ---------------------------------------------------------------------------------------- dmm
class Dmm(MatchingConfig):
    multiplier: float = Field(1.0)  # dm_multiplier: scale of the summed datamodel correction
    diagonal_only: bool = False  # keep only theta[i, i, :] for i in F (dm-direct's option)


# ---------------------------------------------------------------------------------------- del
class Del(MethodConfig):
    """Defaults: CIFAR-10/ResNet-18 in `scripts/run_unlearn.sh` and `run_generat_mask.sh`, except the
    weight decay: the reference fine-tunes with its pretraining's (0), ours is our pretraining's (5e-4)."""

    budget: float = Field(0.3, gt=0, le=1)  # fraction of all entries reset and fine-tuned
    top_fraction: float = Field(0.1, gt=0, le=1)  # h = max(1, floor(top_fraction * out_channels))
    forget_batch_size: int = Field(128, ge=1)  # criticality batches (last partial batch kept)
    lr: float = Field(0.015, gt=0)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)  # = train.weight_decay's default (the reference: 0 = its pretraining's)
    eta_min_fraction: float = Field(0.01, ge=0, le=1)  # cosine floor, as a fraction of lr
    # True: the final layer is ranked and reset like every tensor (the reference's `fc`); False keeps it
    # last in the ranking (not reset below budget 1, still fine-tuned whole): a departure, for models whose head rows
    # are a large share of the entries (0.49 % a row on the digits MLP, 0.005 % on a ResNet-18)
    reset_head: bool = True


# ---------------------------------------------------------------------------------------- sfron
class Sfron(MethodConfig):
    """Defaults: the CIFAR-10 / ResNet-18 / 10 % random block of the reference."""

    lr: float = Field(0.01, gt=0)  # `retain_lr`, cosine-annealed over n_iters
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    n_iters: int = Field(1500, ge=1)
    forget_freq: int = Field(5, ge=1)  # an ascent step every forget_freq iterations
    forget_alpha: float = Field(25.0, ge=0)  # alpha0
    max_norm: float = Field(7.0, gt=0)  # per-member grad-norm clip, ascent steps only
    lambd: float = Field(0.5, ge=0)  # temperature of the adaptive weights (lambda in the paper)
    gamma: float = Field(1.0, gt=0)  # Fisher-ratio threshold of the saliency mask (`th`)
    batch_size: int = Field(128, ge=1)  # forget and retain batches
    # both Fishers from batches of min(fisher_batch_size, |F|) points: the squared batch-mean gradient
    # shrinks with the batch, so unequal batches bias the ratio (the reference: 128 and 128)
    fisher_batch_size: int = Field(128, ge=1)
    reference_step: bool = True  # ascent steps move unmasked entries by momentum/wd, as the reference's SGD



# ---------------------------------------------------------------------------------------- camu
class Camu(MethodConfig):
    kl_lr: float = Field(1e-5, gt=0)  # KL_LR, step A
    impair_lr: float = Field(1e-4, gt=0)  # IMPAIR_LR, step B
    epochs: int = Field(10, ge=1)  # IMPAIR_EPOCHS
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(1e-4, ge=0)  # both Adams
    noise: float = Field(1.0, ge=0)  # x_cf = x_s + noise * U[0, 1) in `noise_space` units
    # raw: U[0, 1) of the pixel range (the reference's MNIST/Fashion images are ToTensor's [0, 1]), i.e.
    # U[0, range_c / std_c) in normalized units; normalized: U[0, 1) after normalizing (its CIFAR recipe)
    noise_space: Literal["raw", "normalized"] = "raw"
    kl_retain_weight: float = 0.5
    kl_forget_weight: float = 0.5
    ce_retain_weight: float = 0.9
    ce_forget_weight: float = 0.01


NEEDS = {
    "do_nothing": (),
    "finetune": (),
    "gradient_ascent": (),
    "neggrad_plus": (),
    "scrub": (),
    "dm_direct": ("datamodels",),
    "oracle_matching": ("target_oracles",),
    "dmm": ("datamodels",),
    "del": (),
    "sfron": (),
    "camu": (),
}
