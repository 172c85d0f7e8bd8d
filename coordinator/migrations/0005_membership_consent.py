import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models
from django.db.models import F


def accept_memberships_made_before_consent(apps, schema_editor):
    """Memberships created before consent existed were made by a coordinator alone, and their
    sites have been training for them: they count as accepted, as of when they were made, by
    nobody in particular (accepted_by stays empty, which the audit pages show as "before consent")."""
    Membership = apps.get_model("coordinator", "Membership")
    Membership.objects.filter(accepted_at__isnull=True).update(accepted_at=F("created_at"))


class Migration(migrations.Migration):
    dependencies = [
        ("coordinator", "0004_dp_events_and_delta_budgets"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="membership",
            name="accepted_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="membership",
            name="accepted_by",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.AddField(
            model_name="membership",
            name="left_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.RunPython(accept_memberships_made_before_consent, migrations.RunPython.noop),
    ]
