"""/api/v1/tokens/: list, issue (browser sessions only) and revoke API tokens.

The rules live in portal.tokens, shared with the Tokens page.
"""
from django.core.validators import RegexValidator
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.exceptions import APIException
from rest_framework.response import Response
from rest_framework.views import APIView

from portal import tokens
from portal.roles import UserCredential
from portal.scopes import SCOPES
from portal.throttling import TokenIssueThrottle

ERROR = OpenApiResponse(description="refused: {\"error\": code, \"detail\": reason}")


class TokenSerializer(serializers.Serializer):
    """A token as listed: never its secret."""

    prefix = serializers.CharField(source="token_key", read_only=True,
                                   help_text="the token's first characters, which name it")
    name = serializers.CharField(read_only=True)
    scopes = serializers.ListField(child=serializers.CharField(), read_only=True)
    images = serializers.ListField(child=serializers.UUIDField(), source="image_ids",
                                   read_only=True,
                                   help_text="the only images it may reach; empty: any the "
                                             "user may")
    created = serializers.DateTimeField(read_only=True)
    expiry = serializers.DateTimeField(read_only=True)
    last_used = serializers.DateTimeField(read_only=True, allow_null=True)
    expired = serializers.SerializerMethodField()

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_expired(self, token):
        return token.expiry is not None and token.expiry <= timezone.now()


class IssuedTokenSerializer(TokenSerializer):
    """A token just issued: the one response that carries its secret."""

    token = serializers.CharField(read_only=True,
                                  help_text="the token itself, shown this once and never again")


@extend_schema_field({"type": "array", "minItems": 1,
                      "items": {"type": "string", "enum": sorted(SCOPES)}})
class ScopeListField(serializers.ListField):
    child = serializers.CharField()


class IssueRequestSerializer(serializers.Serializer):
    # Blank (or only spaces, which are trimmed) is refused; the schema says so too.
    name = serializers.CharField(min_length=1, max_length=100,
                                 validators=[RegexValidator(r"\S", "may not be blank")])
    scopes = ScopeListField(allow_empty=False)
    days = serializers.IntegerField(min_value=tokens.MIN_DAYS, max_value=tokens.MAX_DAYS,
                                    required=False, help_text="expiry in days (default: the "
                                                              "portal's token lifetime)")
    images = serializers.ListField(child=serializers.UUIDField(), required=False,
                                   max_length=tokens.MAX_IMAGES,
                                   help_text="restrict the token to these images")


class TokenError(APIException):
    """A portal.tokens refusal as an API error, naming the field at fault."""

    def __init__(self, refused):
        detail = {refused.field: [refused.detail]} if refused.field else refused.detail
        super().__init__(detail=detail, code=refused.code)
        self.status_code = refused.status
        self.default_code = refused.code


class TokenList(APIView):
    permission_classes = [UserCredential]

    def get_throttles(self):
        throttles = super().get_throttles()
        if self.request.method == "POST":
            throttles.append(TokenIssueThrottle())
        return throttles

    @extend_schema(summary="Your own tokens (never their secrets)",
                   responses=TokenSerializer(many=True))
    def get(self, request):
        return Response(TokenSerializer(tokens.own_tokens(request.user), many=True).data)

    @extend_schema(summary="Issue a token (from a signed-in browser session only)",
                   description="The token is in the response once and never again. Scopes "
                               "stay within your role; admins need a verified second factor. "
                               "A request made with a token is refused (403).",
                   request=IssueRequestSerializer,
                   responses={201: IssuedTokenSerializer, 400: ERROR, 403: ERROR, 429: ERROR})
    def post(self, request):
        try:
            tokens.require_may_issue(request)  # before the body: a token may not probe the rules
            body = IssueRequestSerializer(data=request.data)
            body.is_valid(raise_exception=True)
            data = body.validated_data
            instance, secret = tokens.issue(
                request, name=data["name"], scopes=data["scopes"],
                days=data.get("days", tokens.default_days()),
                images=[str(i) for i in data.get("images", [])])
        except tokens.TokenRefused as exc:
            raise TokenError(exc) from None
        payload = IssuedTokenSerializer(instance).data
        payload["token"] = secret
        response = Response(payload, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"
        return response


class TokenDetail(APIView):
    permission_classes = [UserCredential]

    @extend_schema(summary="Revoke a token (your own; admins: anyone's, audited)",
                   responses={204: None, 403: ERROR, 404: ERROR})
    def delete(self, request, prefix):
        try:
            tokens.revoke(request, prefix)
        except tokens.TokenRefused as exc:
            raise TokenError(exc) from None
        return Response(status=status.HTTP_204_NO_CONTENT)
