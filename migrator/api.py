"""/api/v1/ hosts, guests and jobs."""
from django.db.models import Prefetch
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.exceptions import APIException, PermissionDenied
from rest_framework.permissions import BasePermission
from rest_framework.response import Response
from rest_framework.views import APIView

from migrator import access, claims, indoubt, inventory, migration, orchestrate, progress
from migrator.models import Guest, Host
from migrator.serializers import (
    GuestSerializer,
    HostSerializer,
    JobSerializer,
    MigrateRequestSerializer,
    ResolveConflictRequestSerializer,
    ResolveRequestSerializer,
    RestoreRequestSerializer,
    SettleRequestSerializer,
)
from vault import access as vault_access
from vault.models import SavedImage


class Refused(APIException):
    """An OperationError as an API response with its status and reason."""

    def __init__(self, error):
        super().__init__(detail=error.detail, code=error.code)
        self.status_code = error.status
        self.default_code = error.code


def run(operation, *args, **kwargs):
    try:
        return operation(*args, **kwargs)
    except orchestrate.OperationError as exc:
        raise Refused(exc) from None
    except vault_access.ImageAccessDenied as exc:
        raise PermissionDenied(str(exc)) from None


# A job started (or asked to stop or settle), or refused in the current state: a host
# offline or revoked, the guest busy or already running, a job already over, …
STARTED = {202: JobSerializer, 409: OpenApiResponse(
    description="refused in the current state: {\"error\": code, \"detail\": reason}")}


def job_response(job, code=status.HTTP_200_OK):
    return Response(progress.snapshot(job), status=code)


class InventoryPermission(BasePermission):
    """Hosts and guests are visible to admins and auditors (tokens: guests:read)."""

    def has_permission(self, request, view):
        return access.can_read_inventory(request)


class HostList(generics.ListAPIView):
    serializer_class = HostSerializer
    permission_classes = [InventoryPermission]
    queryset = Host.objects.all()


def guests_with_conflicts():
    return Guest.objects.select_related("host").prefetch_related(
        "domain_ids", Prefetch("claim_conflicts", to_attr="open_conflicts",
                               queryset=claims.open_conflicts().select_related(None)
                               .select_related("claimant")))


class GuestList(generics.ListAPIView):
    serializer_class = GuestSerializer
    permission_classes = [InventoryPermission]

    def get_queryset(self):
        return guests_with_conflicts()


class GuestDetail(generics.RetrieveAPIView):
    serializer_class = GuestSerializer
    permission_classes = [InventoryPermission]
    lookup_field = "uuid"

    def get_queryset(self):
        return guests_with_conflicts()


class GuestResolveConflict(APIView):
    """Settle a claim conflict: refuse the claim, or place the guest on the claimant."""

    @extend_schema(request=ResolveConflictRequestSerializer, responses={
        200: GuestSerializer, 409: STARTED[409]})
    def post(self, request, uuid):
        body = ResolveConflictRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        guest = run(claims.request_resolve, request, uuid, body.validated_data["decision"],
                    body.validated_data["host"])
        return Response(GuestSerializer(guest).data)


class GuestSave(APIView):
    @extend_schema(request=None, responses=STARTED)
    def post(self, request, uuid):
        return job_response(run(orchestrate.request_save, request, uuid),
                            status.HTTP_202_ACCEPTED)


class GuestMigrate(APIView):
    @extend_schema(request=MigrateRequestSerializer, responses=STARTED)
    def post(self, request, uuid):
        body = MigrateRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = dict(body.validated_data)
        destination = data.pop("destination")
        job = run(migration.request_migrate, request, uuid, destination, **data)
        return job_response(job, status.HTTP_202_ACCEPTED)


class ImageRestore(vault_access.AuditedImageView, APIView):
    audit_action = {"POST": "restore"}

    @extend_schema(request=RestoreRequestSerializer, responses=STARTED,
                   parameters=[OpenApiParameter(
                       "Idempotency-Key", OpenApiTypes.STR, OpenApiParameter.HEADER,
                       description="a retried request with the same key (even concurrent retries) "
                                   "returns the same job; the same key with another body "
                                   "is 409 idempotency_key_reused")])
    def post(self, request, pk):
        body = RestoreRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        # request_restore asks (and audits) the restore permission: a token needs
        # images:restore, not images:read as well.
        image = get_object_or_404(SavedImage, pk=pk)
        key = request.headers.get("Idempotency-Key", "")[:200]
        job = run(orchestrate.request_restore, request, image, body.validated_data["host"], key)
        return job_response(job, status.HTTP_202_ACCEPTED)


class JobList(generics.ListAPIView):
    serializer_class = JobSerializer

    def get_queryset(self):
        return access.visible_jobs(self.request)

    def list(self, request, *args, **kwargs):
        inventory.expire_stale_jobs()
        return super().list(request, *args, **kwargs)


class JobDetail(APIView):
    @extend_schema(responses=JobSerializer)
    def get(self, request, pk):
        inventory.expire_stale_jobs()
        return job_response(get_object_or_404(access.visible_jobs(request), pk=pk))


class JobAbort(APIView):
    @extend_schema(request=None, responses=STARTED)
    def post(self, request, pk):
        job = get_object_or_404(access.visible_jobs(request), pk=pk)
        return job_response(run(orchestrate.request_abort, request, job),
                            status.HTTP_202_ACCEPTED)


class JobResolve(APIView):
    """Settle a migration left in doubt: which side keeps the guest."""

    @extend_schema(request=ResolveRequestSerializer, responses=STARTED)
    def post(self, request, pk):
        job = get_object_or_404(access.visible_jobs(request), pk=pk)
        body = ResolveRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return job_response(run(indoubt.request_resolve, request, job,
                                body.validated_data["keep"]), status.HTTP_202_ACCEPTED)


class JobSettle(APIView):
    """Settle a job whose outcome is unknown (its agent was away): succeeded or failed."""

    @extend_schema(request=SettleRequestSerializer, responses=STARTED)
    def post(self, request, pk):
        job = get_object_or_404(access.visible_jobs(request), pk=pk)
        body = SettleRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return job_response(run(orchestrate.request_settle, request, job,
                                body.validated_data["state"],
                                body.validated_data.get("reason", "")),
                            status.HTTP_202_ACCEPTED)
