"""Sign-in and sign-out pages (Django's own views, our templates)."""
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.shortcuts import redirect, render
from django.urls import reverse

from portal import twofactor


class LoginView(auth_views.LoginView):
    template_name = "registration/login.html"
    redirect_authenticated_user = True

    def form_valid(self, form):
        response = super().form_valid(form)
        if twofactor.has_device(form.get_user()):
            # The password was right; the second factor comes next.
            query = urlencode({"next": self.get_success_url()})
            return redirect(f"{reverse('2fa-verify')}?{query}")
        return response


class LogoutView(auth_views.LogoutView):
    http_method_names = ["post", "options"]


def locked_out(request, original_response=None, credentials=None):
    """The page django-axes shows for a locked-out sign-in (AXES_LOCKOUT_CALLABLE): 429."""
    minutes = int(settings.AXES_COOLOFF_TIME.total_seconds() // 60)
    response = render(request, "registration/locked_out.html",
                      {"minutes": minutes, "limit": settings.LOGIN_FAILURE_LIMIT}, status=429)
    response["Retry-After"] = str(int(settings.AXES_COOLOFF_TIME.total_seconds()))
    return response
