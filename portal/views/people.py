"""Admin-only: the portal's accounts and their roles."""
from django import forms
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect, render

from portal import audit, roles
from portal.roles import admin_required


class NewUserForm(forms.Form):
    username = forms.RegexField(regex=r"^[\w.@+-]{1,150}$", max_length=150)
    role = forms.ChoiceField(choices=[("admin", "admin"), ("auditor", "auditor"),
                                      ("", "none (API client)")], required=False)
    password = forms.CharField(widget=forms.PasswordInput, min_length=12)

    def clean_username(self):
        name = self.cleaned_data["username"]
        if get_user_model().objects.filter(username=name).exists():
            raise forms.ValidationError("That username is taken.")
        return name

    def clean_password(self):
        password = self.cleaned_data["password"]
        validate_password(password)
        return password


@admin_required
def people(request):
    form = NewUserForm(request.POST or None)
    if request.method == "POST" and not roles.acts_as_admin(request):
        audit.record_request(request, "user.create", target="people", outcome="denied",
                             details={"reason": "second factor not verified"})
        raise PermissionDenied("Verify your second factor before creating accounts.")
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        user = get_user_model().objects.create_user(data["username"], password=data["password"])
        roles.set_role(user, data["role"] or None)
        audit.record_request(request, "user.create", target=f"user:{user.username}",
                             details={"role": data["role"] or None})
        messages.success(request, f"Created {user.username}.")
        return redirect("people")
    users = get_user_model().objects.order_by("username").prefetch_related("groups")
    rows = [(u, roles.role_of(u)) for u in users]
    return render(request, "portal/people.html", {"form": form, "rows": rows},
                  status=400 if form.errors else 200)
