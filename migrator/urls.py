from django.urls import path

from migrator import views

urlpatterns = [
    path("", views.job_list, name="jobs"),
    path("<uuid:pk>/", views.job_detail, name="job"),
    path("<uuid:pk>/abort", views.job_abort, name="job-abort"),
    path("<uuid:pk>/resolve", views.job_resolve, name="job-resolve"),
    path("<uuid:pk>/settle", views.job_settle, name="job-settle"),
    path("guests/<uuid:uuid>/", views.guest_detail, name="guest"),
    path("guests/<uuid:uuid>/save", views.guest_save, name="guest-save"),
    path("guests/<uuid:uuid>/resolve-conflict", views.guest_resolve_conflict,
         name="guest-conflict"),
    path("guests/<uuid:uuid>/migrate", views.guest_migrate, name="guest-migrate"),
    path("restore/<uuid:pk>", views.image_restore, name="image-restore"),
]
