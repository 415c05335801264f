"""manage.py vault rotate-key | verify [--all | ID…] | cleanup"""
import uuid

from django.core.management.base import BaseCommand, CommandError

from vault import maintenance
from vault.models import SavedImage


class Command(BaseCommand):
    help = "Vault housekeeping: rotate the master key, verify images, clean up."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        rotate = sub.add_parser("rotate-key", help="new master-key version; re-wrap every data key")
        rotate.add_argument("--retire", action="store_true",
                            help="afterwards, delete master-key versions no image uses")
        verify = sub.add_parser("verify", help="authenticate every chunk of images")
        verify.add_argument("ids", nargs="*")
        verify.add_argument("--all", action="store_true")
        sub.add_parser("cleanup", help="remove partial writes and orphaned objects")

    def handle(self, *args, action, **options):
        getattr(self, "do_" + action.replace("-", "_"))(**options)

    def do_rotate_key(self, retire, **_):
        version, count, retired, failed = maintenance.rotate_keys(retire=retire)
        self.stdout.write(f"master key is now version {version}; re-wrapped {count} data key(s)")
        if retired:
            self.stdout.write(f"retired version(s): {', '.join(map(str, retired))}")
        for image_id, reason in failed.items():
            self.stdout.write(f"{image_id}  LEFT AS IT IS  ({reason})")
        if failed:
            raise CommandError(f"{len(failed)} image(s) could not be re-wrapped (see above; "
                               "nothing retired); run: vault verify --all")

    def do_verify(self, ids, all, **_):
        if all == bool(ids):
            raise CommandError("name image IDs or pass --all (not both)")
        images = SavedImage.objects.all() if all else SavedImage.objects.filter(id__in=_uuids(ids))
        if ids and images.count() != len(set(ids)):
            found = {str(i) for i in images.values_list("id", flat=True)}
            raise CommandError(f"no such image: {', '.join(sorted(set(ids) - found))}")
        failed = 0
        for image, ok, reason in maintenance.verify_images(images.order_by("created_at")):
            self.stdout.write(f"{image.id}  {'OK' if ok else 'FAILED'}  {image.name}"
                              + ("" if ok else f"  ({reason})"))
            failed += not ok
        if failed:
            raise CommandError(f"{failed} image(s) failed verification")

    def do_cleanup(self, **_):
        partials, orphans = maintenance.cleanup_at_startup()
        self.stdout.write(f"removed {partials} partial write(s), {orphans} orphan object(s)")


def _uuids(values):
    try:
        return [uuid.UUID(v) for v in values]
    except ValueError as exc:
        raise CommandError(f"not an image ID: {exc}") from None
