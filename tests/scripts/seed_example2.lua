function CheckFile(filename, actions, size, createtime, mailfrom, recipients, headerdata, headerlines)

 if size > 50000 then
  if senderid ~= 0 then
   actions["SkipSend"] = 1;
  end;
 else
  if senderid ~= 1 then
   actions["SkipSend"] = 1;
  end;
 end;

 return actions;
end;
