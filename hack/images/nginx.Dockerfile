# nginx as the e2e EndpointSlice specs run it: a web server on port 80 that stays up (the
# specs only need running, ready Pods). Debian's nginx package, in the foreground.
ARG BASE
FROM ${BASE}
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
