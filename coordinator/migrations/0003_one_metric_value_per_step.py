from django.db import migrations, models


def keep_the_last_value_per_step(apps, schema_editor):
    """Earlier versions could store a step twice (a re-sent batch); keep the newest of each."""
    MetricPoint = apps.get_model("coordinator", "MetricPoint")
    seen = set()
    duplicates = []
    for point in (
        MetricPoint.objects.order_by("-pk").values("pk", "round_id", "site_id", "name", "step").iterator()
    ):
        key = (point["round_id"], point["site_id"], point["name"], point["step"])
        if key in seen:
            duplicates.append(point["pk"])
        seen.add(key)
    for start in range(0, len(duplicates), 1000):
        MetricPoint.objects.filter(pk__in=duplicates[start : start + 1000]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("coordinator", "0002_round_aggregation_queued_at"),
    ]

    operations = [
        migrations.RunPython(keep_the_last_value_per_step, migrations.RunPython.noop),
        migrations.RemoveIndex(
            model_name="metricpoint",
            name="coordinator_round_i_74e014_idx",
        ),
        migrations.AddConstraint(
            model_name="metricpoint",
            constraint=models.UniqueConstraint(
                fields=("round", "site", "name", "step"), name="one_metric_value_per_step"
            ),
        ),
    ]
