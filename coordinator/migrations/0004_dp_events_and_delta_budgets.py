
from django.db import migrations, models


def pure_budgets_and_events(apps, schema_editor):
    """Budgets made before (epsilon, delta) budgets were pure-epsilon ones: they become
    (epsilon, 0), in federations whose default delta is 0 too, and every round and ledger entry
    with an epsilon (all SVT, pure DP) gets its pure DP event. At delta 0 the accountant composes
    pure events to their exact sum, so every balance reads as it did before."""
    Federation = apps.get_model("coordinator", "Federation")
    Membership = apps.get_model("coordinator", "Membership")
    Round = apps.get_model("coordinator", "Round")
    LedgerEntry = apps.get_model("coordinator", "LedgerEntry")
    Federation.objects.update(budget_delta=0.0)
    Membership.objects.update(budget_delta=0.0)
    for model in (Round, LedgerEntry):
        field = "epsilon_per_site" if model is Round else "epsilon"
        for pk, epsilon in model.objects.filter(**{f"{field}__isnull": False}).values_list("pk", field):
            model.objects.filter(pk=pk).update(dp_event={"kind": "pure", "epsilon": float(epsilon)})


class Migration(migrations.Migration):

    dependencies = [
        ('coordinator', '0003_one_metric_value_per_step'),
    ]

    operations = [
        migrations.AddField(
            model_name='federation',
            name='budget_delta',
            field=models.FloatField(default=1e-05),
        ),
        migrations.AddField(
            model_name='ledgerentry',
            name='dp_event',
            field=models.JSONField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='membership',
            name='budget_delta',
            field=models.FloatField(default=1e-05),
        ),
        migrations.AddField(
            model_name='round',
            name='dp_event',
            field=models.JSONField(blank=True, null=True),
        ),
        migrations.AlterField(
            model_name='federation',
            name='default_mechanism',
            field=models.CharField(choices=[('none', 'None (full update, no protection)'), ('partial', 'Partial sharing (no formal guarantee)'), ('svt', "Sparse vector technique (local DP of each site's update)"), ('dpsgd', 'DP-SGD (patient-level DP)')], default='dpsgd', max_length=16),
        ),
        migrations.AlterField(
            model_name='ledgerentry',
            name='mechanism',
            field=models.CharField(choices=[('none', 'None (full update, no protection)'), ('partial', 'Partial sharing (no formal guarantee)'), ('svt', "Sparse vector technique (local DP of each site's update)"), ('dpsgd', 'DP-SGD (patient-level DP)')], max_length=16),
        ),
        migrations.AlterField(
            model_name='round',
            name='mechanism',
            field=models.CharField(choices=[('none', 'None (full update, no protection)'), ('partial', 'Partial sharing (no formal guarantee)'), ('svt', "Sparse vector technique (local DP of each site's update)"), ('dpsgd', 'DP-SGD (patient-level DP)')], max_length=16),
        ),
        migrations.AlterField(
            model_name='update',
            name='mechanism',
            field=models.CharField(choices=[('none', 'None (full update, no protection)'), ('partial', 'Partial sharing (no formal guarantee)'), ('svt', "Sparse vector technique (local DP of each site's update)"), ('dpsgd', 'DP-SGD (patient-level DP)')], max_length=16),
        ),
        migrations.RunPython(pure_budgets_and_events, migrations.RunPython.noop),
    ]
