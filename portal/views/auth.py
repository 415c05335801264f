"""Sign-in and sign-out pages (Django's own views, our templates)."""
from urllib.parse import urlencode

from django.contrib.auth import views as auth_views
from django.shortcuts import redirect
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
