"""hf_relformer: the Transformer with Shaw relative-position attention as a transformers plugin.

Importing the package registers Relformer with the Auto classes and marks every class for code sharing, so that
`save_pretrained` writes the modeling code and an `auto_map` next to the weights.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_relformer import RelformerConfig
from .modeling_relformer import (
    RelformerForCausalLM,
    RelformerForConditionalGeneration,
    RelformerForMaskedLM,
    RelformerForSequenceClassification,
    RelformerForTokenClassification,
    RelformerModel,
    RelformerPreTrainedModel,
)
from .pipeline_relformer import TASK as TEXT2TEXT_TASK
from .pipeline_relformer import RelformerText2TextPipeline

__version__ = "0.1.0"

_AUTO_CLASSES = {
    AutoModel: RelformerModel,
    AutoModelForCausalLM: RelformerForCausalLM,
    AutoModelForSeq2SeqLM: RelformerForConditionalGeneration,
    AutoModelForMaskedLM: RelformerForMaskedLM,
    AutoModelForSequenceClassification: RelformerForSequenceClassification,
    AutoModelForTokenClassification: RelformerForTokenClassification,
}

AutoConfig.register(RelformerConfig.model_type, RelformerConfig, exist_ok=True)
RelformerConfig.register_for_auto_class()
for _auto_class, _model_class in _AUTO_CLASSES.items():
    _auto_class.register(RelformerConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class.__name__)

PIPELINE_REGISTRY.register_pipeline(
    TEXT2TEXT_TASK, pipeline_class=RelformerText2TextPipeline, pt_model=AutoModelForSeq2SeqLM, type="text"
)

__all__ = [
    "RelformerConfig",
    "RelformerForCausalLM",
    "RelformerForConditionalGeneration",
    "RelformerForMaskedLM",
    "RelformerForSequenceClassification",
    "RelformerForTokenClassification",
    "RelformerModel",
    "RelformerPreTrainedModel",
    "RelformerText2TextPipeline",
    "__version__",
]
