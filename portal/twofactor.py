"""The second factor: TOTP enrolment by QR code, backup codes, verification.

Built on django-otp. A session is *verified* once the user has entered a code
from a confirmed device; admin actions require that (see roles.acts_as_admin).
"""
import base64
import io
import secrets

import qrcode
import qrcode.image.svg
from django.conf import settings
from django_otp import login as otp_login
from django_otp import match_token
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from portal import audit
from portal.models import Outcome

BACKUP_CODES = 10


def has_device(user) -> bool:
    return TOTPDevice.objects.filter(user=user, confirmed=True).exists()


def is_verified(request) -> bool:
    user = getattr(request, "user", None)
    return bool(user and getattr(user, "is_verified", lambda: False)())


def required() -> bool:
    return settings.REQUIRE_2FA


def start_enrolment(user) -> TOTPDevice:
    """A fresh unconfirmed TOTP device (earlier unconfirmed ones are dropped)."""
    TOTPDevice.objects.filter(user=user, confirmed=False).delete()
    return TOTPDevice.objects.create(user=user, name="authenticator", confirmed=False)


def pending_device(user):
    return TOTPDevice.objects.filter(user=user, confirmed=False).order_by("-id").first()


def qr_data_uri(device) -> str:
    """The otpauth:// URL as an SVG QR code in a data: URI (allowed by our CSP)."""
    image = qrcode.make(device.config_url, image_factory=qrcode.image.svg.SvgPathImage)
    buffer = io.BytesIO()
    image.save(buffer)
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode()


def confirm_enrolment(request, device, token) -> list[str] | None:
    """Confirm ``device`` with a first code; return new backup codes (shown once)."""
    if not device.verify_token(token):
        audit.record_request(request, "2fa.enroll", target=f"user:{request.user.username}",
                             outcome=Outcome.FAILED, details={"reason": "wrong code"})
        return None
    TOTPDevice.objects.filter(user=request.user, confirmed=True).delete()
    device.confirmed = True
    device.save()
    codes = _new_backup_codes(request.user)
    otp_login(request, device)
    audit.record_request(request, "2fa.enroll", target=f"user:{request.user.username}")
    return codes


def _new_backup_codes(user):
    StaticDevice.objects.filter(user=user).delete()
    device = StaticDevice.objects.create(user=user, name="backup codes", confirmed=True)
    codes = [secrets.token_hex(5) for _ in range(BACKUP_CODES)]
    StaticToken.objects.bulk_create(StaticToken(device=device, token=c) for c in codes)
    return codes


def verify(request, token) -> bool:
    """Check a TOTP or backup code; on success the session becomes verified."""
    device = match_token(request.user, token.strip().replace(" ", ""))
    target = f"user:{request.user.username}"
    if device is None:
        audit.record_request(request, "2fa.verify", target=target, outcome=Outcome.FAILED,
                             details={"reason": "wrong code"})
        return False
    otp_login(request, device)
    audit.record_request(request, "2fa.verify", target=target,
                         details={"device": "backup code" if isinstance(device, StaticDevice)
                                  else "authenticator"})
    return True
