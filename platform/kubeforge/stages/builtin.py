"""The built-in stages, registered in the order that breaks ties in a pipeline's stage order.

The tune stage comes before the stages it can search over, so that it runs before its target
whenever the target does not read its output.
"""

from kubeforge.stages import register
from kubeforge.stages.data import DATA
from kubeforge.stages.evaluate import EVALUATE
from kubeforge.stages.finetune import FINETUNE
from kubeforge.stages.pretrain import PRETRAIN
from kubeforge.stages.promote import PROMOTE
from kubeforge.stages.quantize import QUANTIZE
from kubeforge.stages.reward import REWARD
from kubeforge.stages.rl import RL
from kubeforge.stages.tune import TUNE

for _stage in (DATA, TUNE, PRETRAIN, FINETUNE, REWARD, RL, EVALUATE, QUANTIZE, PROMOTE):
    register(_stage)
