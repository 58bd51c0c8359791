-- Argo CD health for idpo.dev/IterativeDPORun (resource.customizations.health.idpo.dev_IterativeDPORun).
-- Healthy once the run Succeeded; Degraded when it Failed (Stalled); Suspended while spec.suspend;
-- Progressing otherwise, including while the operator has not yet observed the latest spec.
local hs = { status = "Progressing", message = "Waiting for the idpo operator" }
if obj.status == nil then
  return hs
end
local generation = obj.metadata and obj.metadata.generation or 0
local observed = obj.status.observedGeneration or 0
if observed < generation then
  hs.message = "The idpo operator has not observed generation " .. generation .. " yet"
  return hs
end
local phase = obj.status.phase or "Pending"
hs.message = obj.status.message or phase
if phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Suspended" then
  hs.status = "Suspended"
end
return hs
