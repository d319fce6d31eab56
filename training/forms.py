from django import forms
from django.utils.translation import gettext_lazy as _

from training.services import HYPERPARAMETER_BOUNDS, default_hyperparameters

LABELS = {
    "lora_r": _("LoRA rank (r)"),
    "lora_alpha": _("LoRA alpha"),
    "lora_dropout": _("LoRA dropout"),
    "learning_rate": _("learning rate"),
    "batch_size": _("batch size"),
    "grad_accum": _("gradient accumulation steps"),
    "epochs": _("epochs"),
    "max_length": _("max length (tokens)"),
    "target_modules": _("target modules"),
}
HELP = {
    "lora_r": _("Rank of the LoRA matrices. 8 is the seed's default; 16–32 learn more facts, slower."),
    "lora_alpha": _("LoRA scaling; alpha / r multiplies the update. Seed default 32."),
    "lora_dropout": _("Dropout on the LoRA input; 0.05 by default, 0 to memorise small sets exactly."),
    "learning_rate": _("Seed default 5e-4. Lower it if the loss jumps around."),
    "batch_size": _("Pairs per forward pass. Out of memory? Lower this first (4 → 2)."),
    "grad_accum": _("Forward passes per optimiser step; effective batch = batch size × this."),
    "epochs": _("Passes over the data. Too little data or vague answers? Try 5–10."),
    "max_length": _("Tokens per pair (question + answer); longer pairs are truncated. Out of memory? 512 → 256."),
    "target_modules": _("Layers that get LoRA: all-linear (measured best), or names like q_proj,v_proj."),
}


class TrainingRunForm(forms.Form):
    """Hyper-parameters for a new run, defaults from the seed tutorial."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        defaults = default_hyperparameters()
        for name, (low, high) in HYPERPARAMETER_BOUNDS.items():
            field_class = forms.FloatField if isinstance(low, float) else forms.IntegerField
            self.fields[name] = field_class(
                label=LABELS[name], min_value=low, max_value=high, initial=defaults[name], help_text=HELP[name]
            )
        self.fields["target_modules"] = forms.CharField(
            label=LABELS["target_modules"], initial=defaults["target_modules"], max_length=300, help_text=HELP["target_modules"]
        )
