from django.urls import path

from vault import views

urlpatterns = [
    path("", views.image_list, name="vault"),
    path("upload/", views.image_upload, name="vault-upload"),
    path("<uuid:pk>/", views.image_detail, name="vault-image"),
    path("<uuid:pk>/grants", views.image_grant, name="vault-image-grant"),
    path("<uuid:pk>/verify", views.image_verify, name="vault-image-verify"),
    path("<uuid:pk>/delete", views.image_delete, name="vault-image-delete"),
]
