"""The Tokens page: everyone lists, issues and revokes their own API tokens.

The rules (session only, second factor for admins, scopes within the role, images
the user may view) are portal.tokens, shared with /api/v1/tokens/.
"""
import re

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from portal import tokens
from portal.scopes import SCOPES
from portal.throttling import charge_token_issue

SEPARATORS = re.compile(r"[\s,]+")


class IssueForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="what the token is for, e.g. nightly backup")
    scopes = forms.MultipleChoiceField(choices=[(s, s) for s in SCOPES],
                                       widget=forms.CheckboxSelectMultiple)
    days = forms.IntegerField(label="Expires after (days)", min_value=tokens.MIN_DAYS,
                              max_value=tokens.MAX_DAYS)
    images = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}),
                             label="Only these images (optional)",
                             help_text="image IDs, separated by spaces, commas or new lines; "
                                       "empty: any image you may use")

    def clean_images(self):
        return [value for value in SEPARATORS.split(self.cleaned_data["images"]) if value]


def _page(request, form, status=200):
    allowed = tokens.allowed_scopes(request.user)
    chosen = set(form["scopes"].value() or [])
    scope_rows = [{"name": name, "text": text, "allowed": name in allowed,
                   "checked": name in chosen} for name, text in SCOPES.items()]
    return render(request, "portal/tokens.html", {
        "form": form, "tokens": tokens.own_tokens(request.user), "scope_rows": scope_rows,
        "refusal": tokens.issue_refusal(request), "now": timezone.now()}, status=status)


@never_cache
@login_required
def token_list(request):
    if request.method != "POST":
        return _page(request, IssueForm(initial={"days": tokens.default_days()}))
    form = IssueForm(request.POST)
    try:
        tokens.require_may_issue(request)
    except tokens.TokenRefused as exc:
        raise PermissionDenied(exc.detail) from None
    if charge_token_issue(request) is not None:
        form.add_error(None, "Too many tokens issued just now; try again later.")
        return _page(request, form, status=429)
    if not form.is_valid():
        return _page(request, form, status=400)
    data = form.cleaned_data
    try:
        instance, secret = tokens.issue(request, name=data["name"], scopes=data["scopes"],
                                        days=data["days"], images=data["images"])
    except tokens.TokenRefused as exc:
        if exc.field is None:
            raise PermissionDenied(exc.detail) from None
        form.add_error(exc.field, exc.detail)
        return _page(request, form, status=400)
    return render(request, "portal/token_issued.html", {"token": instance, "secret": secret})


@never_cache
@login_required
@require_POST
def token_revoke(request, prefix):
    try:
        tokens.revoke(request, prefix)
    except tokens.TokenRefused as exc:
        if exc.status == 404:
            raise Http404(exc.detail) from None
        raise PermissionDenied(exc.detail) from None
    messages.success(request, f"Revoked token {prefix}.")
    return redirect("tokens")
