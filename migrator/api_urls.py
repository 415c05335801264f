"""/api/v1/ routes for hosts, guests and jobs (mounted by portal/api/urls.py)."""
from django.urls import path

from migrator import api

urlpatterns = [
    path("hosts/", api.HostList.as_view(), name="api-hosts"),
    path("guests/", api.GuestList.as_view(), name="api-guests"),
    path("guests/<uuid:uuid>", api.GuestDetail.as_view(), name="api-guest"),
    path("guests/<uuid:uuid>/save", api.GuestSave.as_view(), name="api-guest-save"),
    path("guests/<uuid:uuid>/resolve-conflict", api.GuestResolveConflict.as_view(),
         name="api-guest-conflict"),
    path("guests/<uuid:uuid>/migrate", api.GuestMigrate.as_view(), name="api-guest-migrate"),
    path("images/<uuid:pk>/restore", api.ImageRestore.as_view(), name="api-image-restore"),
    path("jobs/", api.JobList.as_view(), name="api-jobs"),
    path("jobs/<uuid:pk>", api.JobDetail.as_view(), name="api-job"),
    path("jobs/<uuid:pk>/abort", api.JobAbort.as_view(), name="api-job-abort"),
    path("jobs/<uuid:pk>/resolve", api.JobResolve.as_view(), name="api-job-resolve"),
    path("jobs/<uuid:pk>/settle", api.JobSettle.as_view(), name="api-job-settle"),
]
