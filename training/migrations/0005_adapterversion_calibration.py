from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("training", "0004_trainingrun_interrupted"),
    ]

    operations = [
        migrations.AddField(
            model_name="adapterversion",
            name="curated_threshold",
            field=models.FloatField(
                blank=True, help_text="A top match scoring at least this gets its curated answer verbatim.", null=True,
                verbose_name="curated threshold",
            ),
        ),
        migrations.AddField(
            model_name="adapterversion",
            name="fallback_threshold",
            field=models.FloatField(
                blank=True, help_text="A top match scoring below this gets the fallback reply and a handoff offer.", null=True,
                verbose_name="fallback threshold",
            ),
        ),
        migrations.AddField(
            model_name="adapterversion",
            name="calibration",
            field=models.JSONField(blank=True, default=dict, verbose_name="calibration"),
        ),
    ]
