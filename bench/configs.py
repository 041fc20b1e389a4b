"""Config text for the nginx backends and the HAProxy baseline (pure: no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def nginx_config(workdir: Path, ports: Sequence[int]) -> str:
    """A foreground single-process nginx answering `ok` on each port."""
    servers = "\n".join(
        f"""    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}"""
        for port in ports
    )
    # All writable paths live in workdir so nothing touches /var/lib/nginx or /var/log.
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 100000;
    keepalive_timeout 75s;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    fastcgi_temp_path {workdir}/nginx-fastcgi;
    uwsgi_temp_path {workdir}/nginx-uwsgi;
    scgi_temp_path {workdir}/nginx-scgi;
{servers}
}}
"""


def haproxy_config(
    listen_port: int,
    backend_ports: Sequence[int],
    combined_pem: Path | None = None,
    alpn: str = "http/1.1",
    *,
    tcp: bool = False,
) -> str:
    """Single-thread HAProxy, round-robin, no logging: HTTP mode with connection reuse, or
    `mode tcp` (one backend connection per client connection, bytes relayed)."""
    bind = f"bind 127.0.0.1:{listen_port}"
    if combined_pem is not None:
        bind += f" ssl crt {combined_pem} alpn {alpn}"
    servers = "\n".join(f"    server b{i} 127.0.0.1:{port}" for i, port in enumerate(backend_ports))
    if tcp:
        return f"""global
    nbthread 1
    maxconn 4096

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend fe
    {bind}
    default_backend be

backend be
    balance roundrobin
{servers}
"""
    return f"""global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 75s
    http-reuse always

frontend fe
    {bind}
    default_backend be

backend be
    balance roundrobin
{servers}
"""
