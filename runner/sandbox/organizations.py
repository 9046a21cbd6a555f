"""Better Auth 1.6.0's organization plugin as Mana runs it: spaces, memberships, invitations (contract §8).

Modelled on `dist/plugins/organization/routes/crud-{org,invites,members}.mjs`: the same paths,
bodies, answers and refusals (`{"message", "code"}`, Better Auth's shape), and the checks in the
order the source makes them. Mana's own hook (services/mana-auth/src/spaces/metadata.ts) refuses a
space without a valid `metadata.type`; it runs after the slug check, as `beforeCreateOrganization`
does. Every route needs Better Auth's session cookie (the origin check in runner/sandbox/auth.py
applies to the POSTs). Owners and admins may invite and remove; members may not.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from runner.sandbox.auth import AuthService, better_auth_error, json_body
from runner.sandbox.store import Store, iso

SPACE_TYPES = ("personal", "brand", "club", "family", "team", "practice")  # packages/shared-types/src/spaces.ts
ROLES = ("owner", "admin", "member")
MANAGERS = ("owner", "admin")
INVITATION_TTL = timedelta(hours=48)  # invitationExpiresIn's default
# organization/error-codes.mjs
ERRORS = {
    "ORGANIZATION_ALREADY_EXISTS": "Organization already exists",
    "ORGANIZATION_SLUG_ALREADY_TAKEN": "Organization slug already taken",
    "ORGANIZATION_NOT_FOUND": "Organization not found",
    "MEMBER_NOT_FOUND": "Member not found",
    "ROLE_NOT_FOUND": "Role not found",
    "USER_IS_ALREADY_A_MEMBER_OF_THIS_ORGANIZATION": "User is already a member of this organization",
    "USER_IS_ALREADY_INVITED_TO_THIS_ORGANIZATION": "User is already invited to this organization",
    "YOU_ARE_NOT_ALLOWED_TO_INVITE_USERS_TO_THIS_ORGANIZATION": (
        "You are not allowed to invite users to this organization"
    ),
    "YOU_ARE_NOT_ALLOWED_TO_DELETE_THIS_MEMBER": "You are not allowed to delete this member",
    "YOU_CANNOT_LEAVE_THE_ORGANIZATION_AS_THE_ONLY_OWNER": "You cannot leave the organization as the only owner",
    "INVITATION_NOT_FOUND": "Invitation not found",
    "YOU_ARE_NOT_THE_RECIPIENT_OF_THE_INVITATION": "You are not the recipient of the invitation",
    "YOU_ARE_NOT_A_MEMBER_OF_THIS_ORGANIZATION": "You are not a member of this organization",
}
SPACE_METADATA_INVALID = (
    f'Organization metadata must include a valid "type" field. Expected one of: {", ".join(SPACE_TYPES)}.'
)


def _refuse(status: int, code: str) -> JSONResponse:
    return better_auth_error(status, code, ERRORS[code])


def _member(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "organizationId": row["space_id"],
        "userId": row["user_id"],
        "role": row["role"],
        "createdAt": row["created_at"],
    }


def _invitation(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "email": row["email"],
        "role": row["role"],
        "organizationId": row["space_id"],
        "inviterId": row["inviter_id"],
        "status": row["status"],
        "expiresAt": row["expires_at"],
        "createdAt": row["created_at"],
        "teamId": None,
    }


class Organizations:
    def __init__(self, store: Store, auth: AuthService) -> None:
        self.store, self.auth = store, auth

    def _user(self, request: Request) -> dict[str, Any] | None:
        session = self.auth.session_from_cookie(request)
        return self.store.persona(session.user_id) if session is not None else None

    async def create(self, request: Request) -> Response:
        user = self._user(request)
        if user is None:
            return better_auth_error(401, "UNAUTHORIZED", "Unauthorized")
        body = await json_body(request)
        name, slug = (body.get("name"), body.get("slug")) if isinstance(body, dict) else (None, None)
        metadata = body.get("metadata") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name or not isinstance(slug, str) or not slug:
            return better_auth_error(400, "VALIDATION_ERROR", "name and slug are required non-empty strings")
        if metadata is not None and not isinstance(metadata, dict):
            return better_auth_error(400, "VALIDATION_ERROR", "metadata must be an object")
        if self.store.space_by_slug(slug) is not None:
            return _refuse(400, "ORGANIZATION_ALREADY_EXISTS")
        kind = metadata.get("type") if metadata else None
        if kind not in SPACE_TYPES:
            return better_auth_error(400, "SPACE_METADATA_INVALID", SPACE_METADATA_INVALID)
        # Observed on Mana: a space created through this route has its metadata stored as a JSON string.
        stored = json.dumps(metadata, separators=(",", ":"))
        space, member = self.store.create_space(user["id"], name, slug, str(kind), stored, self.auth.clock.now())
        return JSONResponse(
            {
                "id": space["id"],
                "name": space["name"],
                "slug": space["slug"],
                "logo": None,
                "createdAt": member["created_at"],
                "metadata": metadata,
                "members": [_member(member)],
            }
        )

    async def check_slug(self, request: Request) -> Response:
        if self._user(request) is None:
            return better_auth_error(401, "UNAUTHORIZED", "Unauthorized")
        body = await json_body(request)
        slug = body.get("slug") if isinstance(body, dict) else None
        if not isinstance(slug, str):
            return better_auth_error(400, "VALIDATION_ERROR", "slug is a required string")
        if self.store.space_by_slug(slug) is None:
            return JSONResponse({"status": True})
        return _refuse(400, "ORGANIZATION_SLUG_ALREADY_TAKEN")

    async def invite(self, request: Request) -> Response:
        user = self._user(request)
        if user is None:
            return better_auth_error(401, "UNAUTHORIZED", "Unauthorized")
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("email"), str) or "role" not in body:
            return better_auth_error(400, "VALIDATION_ERROR", "email and role are required")
        space_id = body.get("organizationId")
        if not isinstance(space_id, str) or not space_id:
            return _refuse(400, "ORGANIZATION_NOT_FOUND")  # no active organization is modelled
        email = body["email"].lower()
        if "@" not in email:
            return better_auth_error(400, "INVALID_EMAIL", "Invalid email")
        member = self.store.member(space_id, user["id"])
        if member is None:
            return _refuse(400, "MEMBER_NOT_FOUND")
        if member["role"] not in MANAGERS:
            return _refuse(403, "YOU_ARE_NOT_ALLOWED_TO_INVITE_USERS_TO_THIS_ORGANIZATION")
        role = body["role"]
        if role not in ROLES:
            return better_auth_error(400, "BAD_REQUEST", f"{ERRORS['ROLE_NOT_FOUND']}: {role}")
        invitee = self.store.persona_by_email(email)
        if invitee is not None and self.store.member(space_id, invitee["id"]) is not None:
            return _refuse(400, "USER_IS_ALREADY_A_MEMBER_OF_THIS_ORGANIZATION")
        if self.store.pending_invitations(email, space_id):
            return _refuse(400, "USER_IS_ALREADY_INVITED_TO_THIS_ORGANIZATION")
        if self.store.space_by_id(space_id) is None:
            return _refuse(400, "ORGANIZATION_NOT_FOUND")
        now = self.auth.clock.now()
        invitation = self.store.create_invitation(space_id, email, role, user["id"], now, now + INVITATION_TTL)
        # Mana mails the invitee here; a persona's @mana.test address receives nothing.
        return JSONResponse(_invitation(invitation))

    async def user_invitations(self, request: Request) -> Response:
        user = self._user(request)
        if request.query_params.get("email"):
            return better_auth_error(400, "BAD_REQUEST", "User email cannot be passed for client side API calls.")
        if user is None:
            return better_auth_error(400, "BAD_REQUEST", "Missing session headers, or email query parameter.")
        pending = self.store.pending_invitations(user["email"])
        return JSONResponse([{**_invitation(i), "organizationName": i["organization_name"]} for i in pending])

    async def accept(self, request: Request) -> Response:
        user = self._user(request)
        if user is None:
            return better_auth_error(401, "UNAUTHORIZED", "Unauthorized")
        body = await json_body(request)
        invitation_id = body.get("invitationId") if isinstance(body, dict) else None
        if not isinstance(invitation_id, str):
            return better_auth_error(400, "VALIDATION_ERROR", "invitationId is a required string")
        invitation = self.store.invitation(invitation_id)
        now = self.auth.clock.now()
        if invitation is None or invitation["status"] != "pending" or invitation["expires_at"] < iso(now):
            return _refuse(400, "INVITATION_NOT_FOUND")
        if invitation["email"].lower() != user["email"].lower():
            return _refuse(403, "YOU_ARE_NOT_THE_RECIPIENT_OF_THE_INVITATION")
        if self.store.space_by_id(invitation["space_id"]) is None:
            return _refuse(400, "ORGANIZATION_NOT_FOUND")
        self.store.set_invitation_status(invitation_id, "accepted")
        member = self.store.add_member(invitation["space_id"], user["id"], invitation["role"], now)
        accepted = self.store.invitation(invitation_id)
        assert accepted is not None
        return JSONResponse({"invitation": _invitation(accepted), "member": _member(member)})

    async def list_members(self, request: Request) -> Response:
        user = self._user(request)
        if user is None:
            return better_auth_error(401, "UNAUTHORIZED", "Unauthorized")
        space_id = request.query_params.get("organizationId")
        slug = request.query_params.get("organizationSlug")
        if slug:
            space = self.store.space_by_slug(slug)
            if space is None:
                return _refuse(400, "ORGANIZATION_NOT_FOUND")
            space_id = space["id"]
        if not space_id:
            return better_auth_error(400, "NO_ACTIVE_ORGANIZATION", "No active organization")
        if self.store.member(space_id, user["id"]) is None:
            return _refuse(403, "YOU_ARE_NOT_A_MEMBER_OF_THIS_ORGANIZATION")
        members = [
            {**_member(m), "user": {"id": m["user_id"], "name": m["name"], "email": m["email"], "image": None}}
            for m in self.store.members(space_id)
        ]
        return JSONResponse({"members": members, "total": len(members)})

    async def remove_member(self, request: Request) -> Response:
        user = self._user(request)
        if user is None:
            return better_auth_error(401, "UNAUTHORIZED", "Unauthorized")
        body = await json_body(request)
        target = body.get("memberIdOrEmail") if isinstance(body, dict) else None
        space_id = body.get("organizationId") if isinstance(body, dict) else None
        if not isinstance(target, str) or not isinstance(space_id, str) or not space_id:
            return better_auth_error(400, "VALIDATION_ERROR", "memberIdOrEmail and organizationId are required")
        member = self.store.member(space_id, user["id"])
        if member is None:
            return _refuse(400, "MEMBER_NOT_FOUND")
        members = self.store.members(space_id)
        removed = next((m for m in members if target.lower() in (m["id"], m["email"].lower())), None)
        if removed is None:
            return _refuse(400, "MEMBER_NOT_FOUND")
        if removed["role"] == "owner" and sum(1 for m in members if m["role"] == "owner") <= 1:
            return _refuse(400, "YOU_CANNOT_LEAVE_THE_ORGANIZATION_AS_THE_ONLY_OWNER")
        if member["role"] not in MANAGERS:
            return _refuse(401, "YOU_ARE_NOT_ALLOWED_TO_DELETE_THIS_MEMBER")
        self.store.remove_member(space_id, removed["user_id"])
        return JSONResponse({"member": _member(removed)})

    def routes(self) -> list[BaseRoute]:
        base = "/api/auth/organization"
        return [
            Route(f"{base}/create", self.create, methods=["POST"]),
            Route(f"{base}/check-slug", self.check_slug, methods=["POST"]),
            Route(f"{base}/invite-member", self.invite, methods=["POST"]),
            Route(f"{base}/list-user-invitations", self.user_invitations, methods=["GET"]),
            Route(f"{base}/accept-invitation", self.accept, methods=["POST"]),
            Route(f"{base}/list-members", self.list_members, methods=["GET"]),
            Route(f"{base}/remove-member", self.remove_member, methods=["POST"]),
        ]
