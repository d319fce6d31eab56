from rest_framework import serializers

from csplatform.api_fields import NumberField, TextField, WholeNumberField
from csplatform.stored_text import shown

from training.models import AdapterVersion, TrainingRun
from training.services import HYPERPARAMETER_BOUNDS


class TrainingRunSerializer(serializers.ModelSerializer):
    progress_percent = serializers.FloatField(read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    snapshot_sha256 = serializers.CharField(source="snapshot.sha256", read_only=True)
    adapter_version = serializers.SerializerMethodField()
    error = serializers.SerializerMethodField()

    class Meta:
        model = TrainingRun
        fields = [
            "id", "status", "hyperparameters", "base_model", "snapshot", "snapshot_sha256", "step", "total_steps",
            "progress_percent", "eta_seconds", "loss", "loss_history", "dev_loss_history", "eval_results", "error",
            "cancel_requested", "heartbeat_at", "started_at", "finished_at", "created_at", "created_by", "adapter_version",
        ]
        read_only_fields = fields

    def get_adapter_version(self, run) -> str | None:
        version = getattr(run, "adapter", None)
        return version.name if version else None

    def get_error(self, run) -> str:
        """In the request's language: the worker stored it in every language (csplatform.stored_text)."""
        return shown(run.error)


def _bounded(name):
    low, high = HYPERPARAMETER_BOUNDS[name]
    field_class = NumberField if isinstance(low, float) else WholeNumberField
    return field_class(required=False, min_value=low, max_value=high)


class TrainingRunStartSerializer(serializers.Serializer):
    """Hyper-parameters for a new run; every one is optional (defaults from the seed)."""

    lora_r = _bounded("lora_r")
    lora_alpha = _bounded("lora_alpha")
    lora_dropout = _bounded("lora_dropout")
    learning_rate = _bounded("learning_rate")
    batch_size = _bounded("batch_size")
    grad_accum = _bounded("grad_accum")
    epochs = _bounded("epochs")
    max_length = _bounded("max_length")
    target_modules = TextField(required=False, max_length=300)


class FindingSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    pair_ids = serializers.ListField(child=serializers.IntegerField())


class CheckReportSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    errors = FindingSerializer(many=True, help_text="Block the run.")
    warnings = FindingSerializer(many=True)


class TrainingRefusedSerializer(serializers.Serializer):
    """A run refused because the approved pairs failed the data checks (training.datachecks)."""

    detail = serializers.CharField()
    code = serializers.CharField()
    checks = CheckReportSerializer()


class AdapterVersionSerializer(serializers.ModelSerializer):
    class Meta:
        model = AdapterVersion
        fields = [
            "id", "name", "is_active", "run", "base_model", "metrics", "size_bytes", "curated_threshold", "fallback_threshold",
            "calibration", "created_at", "activated_at",
        ]
        read_only_fields = fields
