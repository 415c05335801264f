"""/api/v1/images/… routes (mounted by portal/api/urls.py)."""
from django.urls import path

from vault import api, download

urlpatterns = [
    path("images/", api.ImageList.as_view(), name="api-images"),
    path("images/<uuid:pk>", api.ImageDetail.as_view(), name="api-image"),
    path("images/<uuid:pk>/content", download.image_content, name="api-image-content"),
    path("images/<uuid:pk>/verify", api.ImageVerify.as_view(), name="api-image-verify"),
    path("images/<uuid:pk>/grants", api.ImageGrants.as_view(), name="api-image-grants"),
]
