-- Orthanc (examples/orthanc.json) routes a study to siimcovid serve once no instance has come for StableAge seconds.
-- A study that holds siimcovid's results (series described "siimcovid ...") was predicted: it is not sent again.
function OnStableStudy(studyId, tags, metadata)
   for _, series in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
      if string.find(series['MainDicomTags']['SeriesDescription'] or '', '^siimcovid') then
         return
      end
   end
   print('siimcovid: routing study ' .. studyId .. ' to siimcovid serve')
   RestApiPost('/modalities/siimcovid/store', studyId)  -- SendToModality takes instances only
end
