"""Training core: ``fit`` trains a registered architecture in the mode ``params.train`` names.

Modes (``TrainParams.mode``):

``standard``     cross-entropy with dropout and weight decay from params.
``adversarial``  ``fgsm_rs``: FGSM from a uniform random start, step ``1.25 * epsilon``
                 (Wong et al., "Fast is better than free"); ``pgd``: Madry et al. with
                 ``pgd_steps`` steps of ``2.5 * epsilon / pgd_steps``; ``trades``: Zhang et
                 al., clean cross-entropy plus ``trades_beta`` times the KL divergence to the
                 worst case found by PGD on that KL. Epsilon (on the [0, 1] input scale)
                 ramps linearly from 0 over ``warmup_epochs``.
``dp``           DP-SGD with Opacus (per-sample clipping to ``max_grad_norm`` + Gaussian
                 noise); the epsilon spent is read from the accountant after training.

All modes use Adam with a one-cycle learning rate (``torch.optim.lr_scheduler.OneCycleLR``,
linear, peak ``lr`` after 40% of the steps), as in fast_adversarial's MNIST recipe. Runs are seeded from
``params.seed`` and deterministic on CPU. The device is resolved at call time, never at import.

    loop.py         ``fit``: the epoch loop, mixed precision, the model handed back
    adversarial.py  the per-batch loss of each mode (FGSM-RS, PGD, TRADES)
    dp.py           Opacus wrapping and the privacy report
    checkpoints.py  resumable checkpoints and RNG state
"""

from stages.ml.training.loop import FitResult, check_training_data, fit

__all__ = ["FitResult", "check_training_data", "fit"]
