from django.urls import path

from migrator import views

urlpatterns = [
    path("", views.job_list, name="jobs"),
]
