"""manage.py audit verify [--anchors SOURCE] | rotate-key | anchor | public-key |
export FILE | verify-export FILE --public-key KEY"""
import json
import sys

from django.core.management.base import BaseCommand, CommandError

from portal import audit_anchor
from portal.audit import Actor, keyring, record, rotate_key, verify_chain
from portal.audit_keys import AuditKeyError
from portal.audit_verifier import VerifierError, verify_export_file

EXPORT_ACTION = "audit.export"


class Command(BaseCommand):
    help = ("Check the audit trail's HMAC chain, start a new audit key version, anchor the "
            "chain's head outside the database, or export and check the chain offline.")

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        verify = sub.add_parser("verify",
                                help="verify the chain; non-zero exit names the first break")
        verify.add_argument("--anchors", metavar="SOURCE",
                            help="also check the anchors in SOURCE (an anchor file, a "
                                 "syslog file, or 's3'): fail if the chain ends before one")
        sub.add_parser("rotate-key", help="MAC records from the next one on with a new key "
                                          "(old versions stay: they verify older records)")
        sub.add_parser("anchor", help="sign the chain's head and write it to the anchor sinks")
        sub.add_parser("public-key", help="print the anchor key's public half (for auditors)")
        export = sub.add_parser("export", help="write the whole chain with its anchors, for "
                                               "offline checking (FILE or - for stdout)")
        export.add_argument("file")
        check = sub.add_parser("verify-export", help="check a chain export with only the "
                                                     "anchor public key (no database needed)")
        check.add_argument("file")
        check.add_argument("--public-key", required=True, metavar="KEY",
                           help="ed25519:<base64>, or a file holding it")

    def handle(self, *args, action, **options):
        try:
            handler = {"rotate-key": self._rotate, "anchor": self._anchor,
                       "public-key": self._public_key, "export": self._export,
                       "verify-export": self._verify_export}.get(action, self._verify)
            return handler(**options)
        except (AuditKeyError, audit_anchor.AnchorError, VerifierError) as exc:
            raise CommandError(str(exc)) from None

    def _verify(self, anchors=None, **options):
        result = verify_chain() if anchors is None else audit_anchor.verify_with_anchors(anchors)
        if not result.ok:
            where = f" at record {result.broken_seq}" if result.broken_seq else ""
            raise CommandError(f"audit chain broken{where}: {result.reason}")
        versions = len(keyring().versions())
        checked = f", anchors in {anchors} agree" if anchors else ""
        self.stdout.write(f"audit chain intact: {result.count} records, "
                          f"{versions} key version{'s' if versions != 1 else ''}{checked}")

    def _rotate(self, **options):
        version = rotate_key(Actor.system("manage.py audit rotate-key"))
        self.stdout.write(f"audit key version {version.version} MACs records from "
                          f"{version.first_seq} on; keyring {keyring().path} (back it up "
                          "apart from the database)")

    def _anchor(self, **options):
        anchor, written, failed = audit_anchor.anchor_now()
        if failed:
            raise CommandError(f"audit head {anchor['seq']} anchored to "
                               f"{', '.join(written) or 'no sink'}; failed: {'; '.join(failed)}")
        if not written:
            raise CommandError("no anchor sink is configured (BERTH_AUDIT_ANCHOR_FILE, "
                               "BERTH_AUDIT_ANCHOR_SYSLOG or an S3 vault)")
        self.stdout.write(f"audit head {anchor['seq']} anchored to {', '.join(written)} "
                          f"at {anchor['time']}")

    def _public_key(self, **options):
        self.stdout.write(audit_anchor.public_key_text())

    def _export(self, file, **options):
        out = sys.stdout if file == "-" else None
        try:
            target = out or open(file, "w", encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot write {file}: {exc.strerror}") from None
        record(EXPORT_ACTION, actor=Actor.system("manage.py audit export"),
               target="audit-chain", details={"format": "chain.jsonl"})
        last = ""
        try:
            for chunk in audit_anchor.chain_export():
                target.write(chunk)
                last = chunk or last
        finally:
            if out is None:
                target.close()
        if last.startswith('{"type":"error"'):
            raise CommandError(f"audit export of {file} ends with: "
                               f"{json.loads(last)['detail']}")
        if file != "-":
            self.stdout.write(f"audit chain exported to {file}")

    def _verify_export(self, file, public_key, **options):
        result = verify_export_file(file, public_key)
        if not result.ok:
            raise CommandError(f"audit export NOT verified: {result.reason}")
        self.stdout.write(f"audit export verified: {result.records} records, "
                          f"{result.anchors} anchors, complete as of {result.last_time}")
