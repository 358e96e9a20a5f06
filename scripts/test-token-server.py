#!/usr/bin/env python3
"""A bearer-token server for the test registry (scripts/test-registry.sh start --token).

It answers the realm of docker-registry's `auth: token` challenge the way distribution 2.8
verifies (registry/auth/token/token.go): a JWT signed RS256 by `openssl dgst`, whose header
carries the signing certificate in `x5c` (standard base64 DER; the same self-signed
certificate is the registry's `rootcertbundle`), with the claims iss, sub, aud (a string: 2.8
does not take a list), exp, nbf, iat, jti and `access`, the scopes granted.

Without --htpasswd every caller gets the access it asks for. With it, the token request must
carry basic credentials that `htpasswd -v` accepts; a request without credentials gets a
token granting nothing (as large public registries answer anonymous callers, so the registry
then refuses with insufficient_scope), and wrong credentials get 401.

Python's standard library and the `openssl` command only: nothing to install on Debian 12.
"""

import argparse
import base64
import binascii
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_SECONDS = 300


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def cert_der_b64(pem_path: str) -> str:
    """The certificate's DER in standard base64, as x5c wants it (the PEM body is just that)."""
    lines, inside = [], False
    with open(pem_path, encoding="ascii") as f:
        for line in f:
            line = line.strip()
            if line == "-----BEGIN CERTIFICATE-----":
                inside = True
            elif line == "-----END CERTIFICATE-----":
                break
            elif inside:
                lines.append(line)
    if not lines:
        sys.exit(f"test-token-server: no certificate in {pem_path}")
    return "".join(lines)


def parse_scope(scope: str):
    """`repository:some/name:pull,push` -> (type, name, [actions]); names may hold colons."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


class Issuer:
    def __init__(self, args):
        self.key = args.key
        self.x5c = cert_der_b64(args.cert)
        self.issuer = args.issuer
        self.service = args.service
        self.htpasswd = args.htpasswd

    def check(self, user: str, password: str) -> bool:
        out = subprocess.run(
            ["htpasswd", "-vb", self.htpasswd, user, password],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        return out.returncode == 0

    def sign(self, data: bytes) -> bytes:
        out = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", self.key],
            input=data,
            capture_output=True,
            check=True,
        )
        return out.stdout

    def token(self, subject: str, access) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + TOKEN_SECONDS,
            "nbf": now,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = ".".join(
            b64url(json.dumps(part, separators=(",", ":")).encode())
            for part in (header, claims)
        )
        return signing_input + "." + b64url(self.sign(signing_input.encode()))


class Handler(BaseHTTPRequestHandler):
    issuer: Issuer

    def log_message(self, fmt, *args):
        sys.stderr.write("%s %s\n" % (time.strftime("%H:%M:%S"), fmt % args))
        sys.stderr.flush()

    def reply(self, status: int, body: dict, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def refuse(self, status: int, code: str, message: str, headers=()):
        self.log_message("refused: %s", message)
        self.reply(status, {"errors": [{"code": code, "message": message}]}, headers)

    def credentials(self):
        """(user, password) from a basic Authorization header, None without one."""
        value = self.headers.get("Authorization", "")
        scheme, _, encoded = value.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return ("", "")
        return (user, password)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            return self.refuse(404, "NOT_FOUND", f"no such endpoint {url.path}")
        query = urllib.parse.parse_qs(url.query)
        service = query.get("service", [""])[0]
        if service != self.issuer.service:
            return self.refuse(
                400, "DENIED", f"unknown service {service!r} (this issues tokens for "
                f"{self.issuer.service!r})"
            )
        creds = self.credentials()
        subject, grant = "", True
        if self.issuer.htpasswd:
            if creds is None:
                grant = False
            elif not self.issuer.check(*creds):
                return self.refuse(
                    401, "UNAUTHORIZED", "wrong user name or password",
                    [("WWW-Authenticate", 'Basic realm="test-token-server"')],
                )
        if creds is not None:
            subject = creds[0]
        access = []
        for scope in " ".join(query.get("scope", [])).split():
            parsed = parse_scope(scope)
            if parsed and grant:
                kind, name, actions = parsed
                access.append({"type": kind, "name": name, "actions": actions})
        self.log_message(
            "token for %r: %s", subject or "anonymous",
            " ".join(f"{a['type']}:{a['name']}:{','.join(a['actions'])}" for a in access)
            or "no access",
        )
        token = self.issuer.token(subject, access)
        self.reply(200, {
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_SECONDS,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--key", required=True, help="PEM private key (RSA) signing the tokens")
    p.add_argument("--cert", required=True, help="PEM certificate of that key (for x5c)")
    p.add_argument("--issuer", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--addr-file", required=True, help="where to write 127.0.0.1:PORT")
    p.add_argument("--htpasswd", help="require basic credentials from this file")
    args = p.parse_args()
    Handler.issuer = Issuer(args)
    # Port 0: the kernel picks a free port, so there is no race with other tests.
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    addr = "127.0.0.1:%d" % server.server_address[1]
    tmp = args.addr_file + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(addr + "\n")
    os.replace(tmp, args.addr_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
