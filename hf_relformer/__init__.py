"""hf_relformer: the Transformer with Shaw relative-position attention as a transformers plugin.

Importing the package registers Relformer with every Auto class named in `AUTO_MAP` (the same map saved
checkpoints carry, so a new head is added in one place), marks every class for code sharing so that
`save_pretrained` writes the modeling code and an `auto_map` next to the weights, registers the
`relformer-text2text` pipeline, and lists the causal LM where Trainer looks for label-smoothing shifts.
"""

import transformers
from transformers import AutoConfig, AutoModelForSeq2SeqLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pipelines import PIPELINE_REGISTRY

from . import modeling_relformer
from .configuration_relformer import AUTO_MAP, CODE_VERSION, RelformerConfig
from .modeling_relformer import *  # noqa: F403  (the model classes: modeling_relformer.__all__)
from .pipeline_relformer import TASK as TEXT2TEXT_TASK
from .pipeline_relformer import RelformerText2TextPipeline

__version__ = CODE_VERSION  # defined in the shipped configuration file, which records it in every config.json

AutoConfig.register(RelformerConfig.model_type, RelformerConfig, exist_ok=True)
RelformerConfig.register_for_auto_class()
for _auto_name, _reference in AUTO_MAP.items():
    if _auto_name != "AutoConfig":
        _model_class = getattr(modeling_relformer, _reference.split(".")[-1])
        getattr(transformers, _auto_name).register(RelformerConfig, _model_class, exist_ok=True)
        _model_class.register_for_auto_class(_auto_name)

# Trainer shifts labels before label smoothing only for class names in transformers' own causal-LM list, which
# registration does not reach: without this entry `label_smoothing_factor` would smooth unshifted labels.
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(RelformerConfig.model_type, "RelformerForCausalLM")

PIPELINE_REGISTRY.register_pipeline(
    TEXT2TEXT_TASK, pipeline_class=RelformerText2TextPipeline, pt_model=AutoModelForSeq2SeqLM, type="text"
)

__all__ = ["RelformerConfig", *modeling_relformer.__all__, "RelformerText2TextPipeline", "__version__"]
