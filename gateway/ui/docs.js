// The JobProxy API docs: Swagger UI rendering the gateway's own OpenAPI document (/v1/openapi.json).
"use strict";
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
});
