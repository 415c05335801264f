from django.urls import path

from vault import views

urlpatterns = [
    path("", views.image_list, name="vault"),
]
