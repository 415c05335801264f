"""The vault under /api/v1/images/ (upload is vault.upload, download vault.download)."""
import uuid

from django import forms
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from portal import audit
from portal.models import Outcome
from vault import access, grants, service
from vault.models import SavedImage
from vault.serializers import GrantSerializer, SavedImageSerializer, VerifyResultSerializer


class ImageFilter(forms.Form):
    guest = forms.CharField(required=False, max_length=200)
    host = forms.CharField(required=False, max_length=200)
    since = forms.DateTimeField(required=False)
    until = forms.DateTimeField(required=False)

    def apply(self, images):
        data = self.cleaned_data
        guest = data.get("guest")
        if guest:
            by_uuid = images.filter(guest_uuid=_uuid_or_none(guest))
            images = images.filter(guest_name=guest) | by_uuid
        if data.get("host"):
            images = images.filter(source_host=data["host"])
        if data.get("since"):
            images = images.filter(created_at__gte=data["since"])
        if data.get("until"):
            images = images.filter(created_at__lte=data["until"])
        return images


def _uuid_or_none(value):
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def filtered_images(request, params):
    form = ImageFilter(params)
    if not form.is_valid():
        return form, SavedImage.objects.none()
    images = form.apply(access.visible_images(request)).select_related("created_by")
    return form, images.order_by("-created_at")


def authorised_image(request, pk, action):
    """Fetch an image (404 if absent) and check ``action`` (403, audited)."""
    image = get_object_or_404(SavedImage, pk=pk)
    try:
        access.require(request, action, image)
    except access.ImageAccessDenied as exc:
        raise PermissionDenied(str(exc)) from None
    return image


class ImageList(access.AuditedImageView, generics.ListAPIView):
    serializer_class = SavedImageSerializer
    audit_action = {"GET": "list", "POST": "upload"}

    def get_queryset(self):
        form, images = filtered_images(self.request, self.request.query_params)
        if not form.is_valid():
            raise ValidationError(form.errors)
        return images

    def list(self, request, *args, **kwargs):
        response = super().list(request, *args, **kwargs)
        audit.record_request(request, "image.list", target="vault",
                             details={"count": response.data["count"],
                                      "filters": request.query_params.dict()})
        return response

    @extend_schema(exclude=True)  # described by portal.api.schema (a raw ASGI endpoint)
    def post(self, request):
        # Reached only when the raw streaming app is bypassed (e.g. WSGI).
        return Response({"error": "unsupported", "detail": "Upload through the ASGI server "
                         "with a raw application/octet-stream body."},
                        status=status.HTTP_501_NOT_IMPLEMENTED)


class ImageDetail(access.AuditedImageView, APIView):
    audit_action = {"GET": "view", "DELETE": "delete"}

    @extend_schema(responses=SavedImageSerializer)
    def get(self, request, pk):
        return Response(SavedImageSerializer(authorised_image(request, pk, "view")).data)

    @extend_schema(responses={204: None})
    def delete(self, request, pk):
        service.delete(authorised_image(request, pk, "delete"), request)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ImageVerify(access.AuditedImageView, APIView):
    audit_action = {"POST": "verify"}

    @extend_schema(request=None, responses={200: VerifyResultSerializer,
                                            422: VerifyResultSerializer})
    def post(self, request, pk):
        image = authorised_image(request, pk, "view")
        ok, reason = service.verify(image, request=request)
        return Response({"id": str(image.id), "ok": ok, "reason": reason},
                        status=status.HTTP_200_OK if ok else status.HTTP_422_UNPROCESSABLE_ENTITY)


class ImageGrants(access.AuditedImageView, APIView):
    audit_action = {"GET": "view", "POST": "grant", "DELETE": "revoke"}

    @extend_schema(responses=GrantSerializer(many=True))
    def get(self, request, pk):
        return Response(grants.list_grants(authorised_image(request, pk, "view")))

    @extend_schema(request=GrantSerializer, responses={201: GrantSerializer(many=True)})
    def post(self, request, pk):
        return self._change(request, pk, add=True)

    # 200 with the grants left (not 204: the answer has a body).
    @extend_schema(request=GrantSerializer, responses={
        200: GrantSerializer(many=True), 400: OpenApiResponse(description="invalid grant")})
    def delete(self, request, pk):
        return self._change(request, pk, add=False)

    def _change(self, request, pk, add):
        image = get_object_or_404(SavedImage, pk=pk)
        if not access.can_grant(request):
            audit.record_request(request, "image.grant" if add else "image.revoke",
                                 target=image.target, outcome=Outcome.DENIED,
                                 details={"reason": "only admins (signed in) manage grants"})
            raise PermissionDenied("Only admins manage grants.")
        serializer = GrantSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            grants.change_grant(request, image, add=add, **serializer.validated_data)
        except grants.GrantError as exc:
            raise ValidationError({"grant": str(exc)}) from None
        return Response(grants.list_grants(image),
                        status=status.HTTP_201_CREATED if add else status.HTTP_200_OK)
