"""Second-factor pages: enrol an authenticator, and verify a code after sign-in."""
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme

from portal import twofactor


class CodeForm(forms.Form):
    code = forms.CharField(max_length=20, label="Code from your authenticator or a backup code",
                           widget=forms.TextInput(attrs={"autocomplete": "one-time-code",
                                                         "inputmode": "numeric"}))


def _next(request):
    target = request.POST.get("next") or request.GET.get("next") or "/"
    if url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        return target
    return "/"


@login_required
def setup(request):
    if twofactor.has_device(request.user) and not twofactor.is_verified(request):
        # Replacing an authenticator needs the current one: otherwise the password
        # alone would let anyone swap in their own device and pass as verified.
        messages.info(request, "Verify with your current authenticator before replacing it.")
        return redirect(f"{reverse('2fa-verify')}?{urlencode({'next': request.path})}")
    device = twofactor.pending_device(request.user) or twofactor.start_enrolment(request.user)
    form = CodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        codes = twofactor.confirm_enrolment(request, device, form.cleaned_data["code"])
        if codes:
            return render(request, "portal/2fa_codes.html", {"codes": codes})
        form.add_error("code", "That code is not right; check your device's clock and retry.")
    return render(request, "portal/2fa_setup.html", {
        "form": form, "qr": twofactor.qr_data_uri(device), "secret": device.config_url,
        "has_device": twofactor.has_device(request.user)},
        status=400 if form.errors else 200)


@login_required
def verify(request):
    if not twofactor.has_device(request.user):
        return redirect("2fa-setup")
    form = CodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        if twofactor.verify(request, form.cleaned_data["code"]):
            messages.success(request, "Second factor verified.")
            return redirect(_next(request))
        form.add_error("code", "That code is not right.")
    return render(request, "portal/2fa_verify.html", {"form": form, "next": _next(request)},
                  status=400 if form.errors else 200)
