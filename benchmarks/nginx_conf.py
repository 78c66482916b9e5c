"""The start of an nginx config for the benchmarks that run the system's nginx from a temp
dir (`{dir}`): one worker process in the foreground, its pid file and error log in that dir,
and the http context's common settings (no access log, temp files in that dir, keep-alive
without a request cap). A benchmark's template is this + its servers + a closing brace."""

NGINX_HEAD = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  keepalive_requests 100000000;
"""
