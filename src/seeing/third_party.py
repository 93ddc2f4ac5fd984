"""Third-party messages a user of this project cannot act on, each dropped by its exact text.

Called by both entry points (``seeing.pipeline``) before any work. Everything else a library
prints or warns stays visible; the causes this project can fix are fixed where they arise
(frozen networks in ``seeing.frozen``, the logging interval in ``seeing.stages.trainer``, W&B's
settings in ``seeing.loggers.WandbLogger``).
"""
from __future__ import annotations

import logging
import warnings

# pytorch-lightning 2.6.6, the newest release (also of the `lightning` package), still builds
# torch's LeafSpec() in lightning/pytorch/utilities/_pytree.py, which torch >= 2.10 deprecates
# with a FutureWarning on every fit (Lightning-AI/pytorch-lightning#21326); the fix is Lightning's
# to make, and its behaviour is unchanged until torch removes LeafSpec.
PYTREE_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
PYTREE_MODULE = r"(pytorch_lightning|lightning\.pytorch)\.utilities\._pytree"
# pytorch-lightning 2.6.6's ModelCheckpoint warns at every periodic save of a manually optimised module
# (the GAN, the reconstruction) unless the module keeps a copy of its weights from before the step
# for it (Lightning-AI/pytorch-lightning#21239). These saves are for resuming, which needs the state
# after the step, with the optimizers and the step count it belongs to: there is nothing to change.
CHECKPOINT_MESSAGE = "Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization"
CHECKPOINT_MODULE = r"(pytorch_lightning|lightning\.pytorch)\.callbacks\.model_checkpoint"
# The reconstruct stage's variants without corrections (d: one pass of the hybrid encoder) have nothing
# to optimise, and still run through Lightning's fit, so they are placed on devices, split between
# processes and exported as every other variant is; Lightning says so at every such fit.
NO_OPTIMIZER_MESSAGE = r"`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer"
NO_OPTIMIZER_MODULE = r"(pytorch_lightning|lightning\.pytorch)\.core\.optimizer"
# torchdata 0.11.0, the newest release, calls torch.set_vital in every StatefulDataLoader (the resumable
# loader Lightning documents for mid-epoch resumes); torch >= 2.9 deprecates that call, which records
# nothing the project or a user reads.
SET_VITAL_MESSAGE = "'set_vital' is deprecated"
SET_VITAL_MODULE = r"torchdata\.stateful_dataloader"
# Lightning >= 2.6 logs an advertisement for its hosted logger at every Trainer built without one
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
LIGHTNING_INFO_LOGGER = "pytorch_lightning.utilities.rank_zero"


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LITLOGGER_TIP)


def quiet_third_party() -> None:
    """Drop the messages above (idempotent)."""
    warnings.filterwarnings("ignore", message=PYTREE_MESSAGE, category=FutureWarning, module=PYTREE_MODULE)
    warnings.filterwarnings("ignore", message=CHECKPOINT_MESSAGE, category=UserWarning, module=CHECKPOINT_MODULE)
    warnings.filterwarnings("ignore", message=NO_OPTIMIZER_MESSAGE, category=UserWarning, module=NO_OPTIMIZER_MODULE)
    warnings.filterwarnings("ignore", message=SET_VITAL_MESSAGE, category=UserWarning, module=SET_VITAL_MODULE)
    info = logging.getLogger(LIGHTNING_INFO_LOGGER)
    if not any(isinstance(f, _DropLitLoggerTip) for f in info.filters):
        info.addFilter(_DropLitLoggerTip())
